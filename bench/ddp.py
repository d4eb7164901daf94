"""DDP settings and compile placement for ResNet-18, measured through bsdist's Trainer.

    torchrun --nproc_per_node 2 bench/ddp.py [--device auto|cpu|cuda] [--batch-size 16] [--steps 3]
                                             [--repeats 3] [--compile] [--out ddp.json]

Every variant trains the same model on the same shards (bsdist's device loader, batch augmentation,
TRAIN.mixed_precision default); `--batch-size` is per process. The variants are timed in turns,
`--repeats` times, so drift of a shared machine hits them alike; the median is reported, as images
per second over all processes and as a ratio to DDP's defaults:
- no DDP: each process steps alone, no gradient exchange (the upper bound, not a valid run);
- DDP defaults: 25 MB buckets, gradients copied into them, dynamic graph;
- + gradient_as_bucket_view, + static_graph (bsdist's default at grad_accum_steps 1), and bucket sizes;
- with --compile: compile then wrap (bsdist) against wrap then compile. Either way dynamo compiles on
  the first call, inside DDP's forward, and then splits the graph at the buckets (DDPOptimizer) so
  that all-reduces can overlap the backward; the number of graphs compiled is printed. Wrapping
  first keeps DDP's graph dynamic (DDPOptimizer with a static graph: pytorch#109261).
BatchNorm is per process in every variant (MODEL.sync_bn false), so that only the DDP options differ.
Images are scikit-learn's real digits scaled to CIFAR's shape, so the benchmark runs offline.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

# timing first: it puts the repository root on sys.path
from timing.data_path import bsdist_data, cifar_shaped_digits, images_per_second, sync
from timing.training import bench_config, bsdist_trainer, timed_epoch

from bsdist import config
from bsdist.distributed import init_distributed, shutdown, world_size_from_env
from bsdist.models import Model, create, distribute

DEFAULT_BUCKET_MB = 25.0  # DDP's own default


def variants(compile_model: bool, bucket_mb: float) -> dict[str, dict]:
    """name -> how the model is run: ddp (None: no wrapper) with its options, and where compile goes."""
    ddp = lambda mb, view, static: {"bucket_mb": mb, "gradient_as_bucket_view": view,  # noqa: E731
                                    "static_graph": static}
    eager = {
        "no DDP (upper bound)": {"ddp": None},
        "DDP defaults": {"ddp": ddp(DEFAULT_BUCKET_MB, False, False)},
        "+ gradient_as_bucket_view": {"ddp": ddp(DEFAULT_BUCKET_MB, True, False)},
        f"+ static_graph (bsdist, {bucket_mb:g} MB)": {"ddp": ddp(bucket_mb, True, True), "bsdist": True},
        "  buckets 5 MB": {"ddp": ddp(5.0, True, True)},
        "  buckets 100 MB (one)": {"ddp": ddp(100.0, True, True)},
    }
    if not compile_model:
        return eager
    return {
        "compiled, no DDP (upper bound)": {"ddp": None, "compile": "before"},
        "compile then wrap (bsdist)": {"ddp": ddp(bucket_mb, True, True), "compile": "before", "bsdist": True},
        "wrap then compile (DDPOptimizer)": {"ddp": ddp(bucket_mb, True, False), "compile": "after"},
    }


def build_variant(spec):
    """In place of build_model, for the Trainer to call: the model run as the variant says (the config's compile,
    sync_bn and DDP settings do not apply)."""
    def build(cfg, num_classes, in_channels, device, *_, **__):
        model = create(cfg, num_classes, in_channels, device, sync_bn=False)
        compiled = torch.compile(model) if spec.get("compile") == "before" else model
        wrapped = compiled if spec["ddp"] is None else distribute(compiled, device, **spec["ddp"])
        if spec.get("compile") == "after":
            wrapped = torch.compile(wrapped)
        return Model(module=model, compiled=compiled, wrapped=wrapped)
    return build


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=16, help="images per process per step")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per variant")
    parser.add_argument("--compile", action="store_true", help="compare compile placements instead of DDP options")
    parser.add_argument("--out", default="ddp.json")
    args = parser.parse_args()
    if args.batch_size * args.steps * world_size_from_env() < 10:
        parser.error("--batch-size x --steps x processes must be at least 10, so that every digit class has an image")
    env = init_distributed(config.resolve_device(args.device), 1800)
    rank0 = env.rank == 0
    try:
        bs, steps = args.batch_size, args.steps
        mixed_precision = config.defaults()["TRAIN"]["mixed_precision"]
        cfgs = {compiled: bench_config(bs, mixed_precision, env, sync_bn=False, compile_model=compiled)
                for compiled in (False, True)}
        cfg = cfgs[False]
        data, targets = cifar_shaped_digits(bs * steps * env.world_size)
        shard = bsdist_data(data, targets, bs, env.device, world_size=env.world_size, rank=env.rank)
        runs = {}

        def prepare(name, spec):
            if spec.get("compile"):
                # else a later model reuses the first one's graphs and dynamo's DDP split never runs
                torch._dynamo.reset()
            graphs_before = torch._dynamo.utils.counters["aot_autograd"]["total"]
            started = time.perf_counter()
            # the bsdist variant is exactly what a run builds; the Trainer seeds the weights alike for all
            trainer = bsdist_trainer(cfgs[spec.get("compile") == "before"], env, shard,
                                     None if spec.get("bsdist") else build_variant(spec))
            timed_epoch(trainer, 0)  # warm: compilation, bucket rebuild, allocator
            graphs = torch._dynamo.utils.counters["aot_autograd"]["total"] - graphs_before
            runs[name] = {"spec": spec, "trainer": trainer, "warm_s": time.perf_counter() - started, "graphs": graphs,
                          "rates": []}
            if rank0:
                print(f"built and warmed {name.strip()} in {runs[name]['warm_s']:.1f} s"
                      + (f" ({graphs} graph(s) compiled)" if spec.get("compile") else ""), flush=True)

        def timed_turn(run, turn):
            sync(env.device)
            torch.distributed.barrier()
            seconds, timed = timed_epoch(run["trainer"], turn + 1)
            run["rates"].append(images_per_second(steps * bs * env.world_size, seconds))
            assert timed == steps, f"timed {timed} steps, asked for {steps}"

        if args.compile:  # each compiled variant is timed right after it was compiled, before the next reset
            for name, spec in variants(True, cfg.TRAIN.ddp_bucket_mb).items():
                prepare(name, spec)
                for turn in range(args.repeats):
                    timed_turn(runs[name], turn)
        else:
            for name, spec in variants(False, cfg.TRAIN.ddp_bucket_mb).items():
                prepare(name, spec)
            for turn in range(args.repeats):
                for run in runs.values():
                    timed_turn(run, turn)
        precision = config.resolve_precision(cfg.TRAIN.mixed_precision, env.device.type)
        report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "world_size": env.world_size,
                  "device": (torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                             else platform.processor() or "cpu"),
                  "backend": torch.distributed.get_backend(), "threads_per_process": torch.get_num_threads(),
                  "batch_size_per_process": bs, "steps_per_turn": steps, "precision": precision, "variants": []}
        baseline = statistics.median(runs["DDP defaults"]["rates"]) if "DDP defaults" in runs else None
        if rank0:
            print(f"{env.world_size} process(es), {report['backend']}, {report['device']}, {precision}, "
                  f"batch {bs} per process, median of {args.repeats} turns of {steps} steps")
        for name, run in runs.items():
            rate = statistics.median(run["rates"])
            ratio = rate / baseline if baseline else None
            report["variants"].append({"name": name.strip(), **run["spec"], "img_per_s": rate, "turns": run["rates"],
                                       "ratio_to_ddp_defaults": ratio, "build_and_warm_s": run["warm_s"],
                                       "compiled_graphs": run["graphs"]})
            if rank0:
                spread = f"{min(run['rates']):,.0f}-{max(run['rates']):,.0f}"
                print(f"  {name:42s} {rate:9,.1f} img/s  (turns {spread})"
                      + (f"  {ratio:.3f}x DDP defaults" if ratio else ""))
    finally:
        shutdown()
    if rank0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
