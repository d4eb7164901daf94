"""Throughput of bsdist's data path and training step against the reference trainer's style.

    python bench/throughput.py [--device auto|cpu|cuda] [--batch-size 512] [--steps 20] [--out bench.json]

Prints, side by side in one run:
- data path alone: reference style (DataLoader + per-image PIL RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize) against bsdist's device loader + batch augmentation;
- training: reference style (that DataLoader, eager fp32 ResNet-18) against bsdist's default
  (device loader, channels_last, TRAIN.mixed_precision default, compile on CUDA) through bsdist's
  `Trainer`; time to the first step;
- on CUDA: the measured bf16 matmul peak and the share of it the training reaches, a sweep of
  eager/compiled x bf16/fp16 x batch 128/512/1024 (each variant compiled afresh and timed over the
  steps it reports);
- an estimate of the reference grid's wall time (18 runs x 50 epochs at the configs' batch 32) from
  batch-32 training and evaluation rates and the per-run start-up, measured in separate processes
  launched like runs; on CUDA with k = 1, 4 and 8 of them side by side on one GPU, the best k used.
The images are scikit-learn's real 8x8 digits scaled to CIFAR's 32x32x3, so the benchmark is offline.
The measurements are in bench/timing/ (data path, training, peak and sweep, grid); this script runs them.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

# timing first: it puts the repository root on sys.path
from timing.data_path import bench_data_path
from timing.grid import GRID_INCLUDES, TEST_BATCH, describe_grid, duration, grid_worker, measure_grid
from timing.peak import matmul_peak_tflops, sweep_variants, train_flops_per_image
from timing.training import bench_bsdist_training, bench_reference_training

from bsdist import config
from bsdist.distributed import init_distributed, shutdown


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--data-batches", type=int, default=10, help="timed batches of the data-path comparison")
    parser.add_argument("--grid-steps", type=int, default=None,
                        help="timed batch-32 steps per side-by-side run (default 200 on CUDA, 2 on CPU)")
    parser.add_argument("--grid-eval-batches", type=int, default=None,
                        help="evaluation batches per side-by-side run (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--grid-test-batch", type=int, default=None,
                        help="evaluation batch size of the side-by-side runs (default 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--out", default="bench.json")
    # one of the side-by-side runs (launched by runs_side_by_side)
    parser.add_argument("--grid-worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--eval-batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--test-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grid_worker:
        args.device = config.resolve_device(args.device)
        return grid_worker(args)
    device_type = config.resolve_device(args.device)
    on_cuda = device_type == "cuda"
    steps = args.steps or (20 if on_cuda else 2)
    bs = args.batch_size
    torch.manual_seed(0)
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch_size": bs}
    env = init_distributed(device_type, 600)
    report["device"] = torch.cuda.get_device_name(env.device) if on_cuda else platform.processor() or "cpu"
    try:
        ref_data, our_data = bench_data_path(bs, env.device, args.data_batches)
        report["data_path"] = {"reference_img_per_s": ref_data, "bsdist_img_per_s": our_data,
                               "ratio": our_data / ref_data, "batches": args.data_batches}
        print(f"data path alone (batch {bs}): reference {ref_data:,.0f} img/s | bsdist {our_data:,.0f} img/s | "
              f"{our_data / ref_data:.1f}x", flush=True)

        precision = config.resolve_precision(config.defaults()["TRAIN"]["mixed_precision"], device_type)
        ref_train = bench_reference_training(bs, env.device, steps)
        ours = bench_bsdist_training(bs, env, steps, on_cuda, precision)
        report["training"] = {"reference_img_per_s": ref_train, "bsdist_img_per_s": ours.img_per_s,
                              "ratio": ours.img_per_s / ref_train, "bsdist_precision": precision,
                              "bsdist_compiled": on_cuda, "time_to_first_step_s": ours.time_to_first_step_s,
                              "timed_steps": ours.timed_steps}
        print(f"training (batch {bs}, {ours.timed_steps} timed steps): "
              f"reference-style eager fp32 {ref_train:,.0f} img/s | "
              f"bsdist default ({precision}, {'compiled' if on_cuda else 'eager'}) {ours.img_per_s:,.0f} img/s | "
              f"{ours.img_per_s / ref_train:.2f}x | first step after {ours.time_to_first_step_s:.1f} s", flush=True)
        flops = train_flops_per_image()
        report["train_gflop_per_image"] = flops / 1e9
        if on_cuda:
            peak = matmul_peak_tflops(env.device)
            report["matmul_peak_tflops_bf16"] = peak
            report["training"]["share_of_peak"] = ours.img_per_s * flops / 1e12 / peak
            print(f"measured bf16 matmul peak {peak:.0f} TFLOP/s; bsdist default reaches "
                  f"{100 * report['training']['share_of_peak']:.1f}% ({flops / 1e9:.2f} GFLOP per training image)")
            report["sweep"] = []
            for compiled, prec, batch in sweep_variants():
                r = bench_bsdist_training(batch, env, steps, compiled, prec)
                report["sweep"].append({**vars(r), "share_of_peak": r.img_per_s * flops / 1e12 / peak})
                print(f"  {'compiled' if compiled else 'eager':8s} {prec} batch {batch:5d}: {r.img_per_s:,.0f} img/s "
                      f"({100 * report['sweep'][-1]['share_of_peak']:.1f}% of peak, {r.timed_steps} steps, "
                      f"first step after {r.time_to_first_step_s:.1f} s)", flush=True)
    finally:
        shutdown()
    if on_cuda:
        torch.cuda.empty_cache()  # the side-by-side runs share this GPU
    ks = (1, 4, 8) if on_cuda else (1,)
    with tempfile.TemporaryDirectory() as workdir:
        report["grid"] = measure_grid(device_type, ks, args.grid_steps or (200 if on_cuda else 2),
                                      args.grid_eval_batches or (10 if on_cuda else 1),
                                      args.grid_test_batch or (TEST_BATCH if on_cuda else 64), workdir)
    report["grid_minutes_estimate"] = report["grid"]["best"]["minutes"]
    for m, e in zip(report["grid"]["side_by_side"], report["grid"]["estimates"]):
        print(f"  {m['processes']} batch-32 run(s) side by side: training {m['train_img_per_s']:,.0f} img/s, "
              f"evaluation {m['eval_img_per_s']:,.0f} img/s in all, start-up {m['startup_s']:.1f} s each -> grid "
              f"{duration(e['minutes'] * 60)}")
    print(describe_grid(report["grid"]) + (" (one process already uses every CPU core: runs side by side not measured)"
                                            if not on_cuda else ""))
    print(f"  includes {GRID_INCLUDES}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
