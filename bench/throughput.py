"""Throughput of bsdist's data path and training step against the reference trainer's style.

    python bench/throughput.py [--device auto|cpu|cuda] [--batch-size 512] [--steps 20] [--out bench.json]

Prints, side by side in one run:
- data path alone: reference style (DataLoader + per-image PIL RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize) against bsdist's device loader + batch augmentation;
- training: reference style (that DataLoader, eager fp32 ResNet-18) against bsdist's default
  (device loader, channels_last, TRAIN.mixed_precision default, compile on CUDA) through the real
  `train_one_epoch`; time to the first step;
- on CUDA: the measured bf16 matmul peak and the share of it the training reaches, a sweep of
  eager/compiled x bf16/fp16 x batch 128/512/1024, and an estimate of the reference grid's wall time.
The images are scikit-learn's real 8x8 digits scaled to CIFAR's 32x32x3, so the benchmark is offline.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from bsdist import config  # noqa: E402
from bsdist.data import Data, DeviceLoader, ResumableBatchSampler  # noqa: E402
from bsdist.data.augment import BatchAugment  # noqa: E402
from bsdist.data.datasets import CIFAR10LT, ImageArrays  # noqa: E402
from bsdist.data.longtail import long_tail_counts  # noqa: E402
from bsdist.distributed import init_distributed, shutdown  # noqa: E402
from bsdist.engine import TrainState, evaluate, train_one_epoch  # noqa: E402
from bsdist.losses import BalancedSoftmax  # noqa: E402
from bsdist.models import resnet18  # noqa: E402
from bsdist.optim import build_optimizer, build_scheduler  # noqa: E402
from bsdist.output import NullOutput  # noqa: E402
from bsdist.train import AMP_DTYPES  # noqa: E402

GRID_EPOCHS, GRID_FACTORS, TEST_IMAGES = 50, (1, 10, 50, 100, 200), 10_000


def cifar_shaped_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    images = np.repeat(np.kron(images, np.ones((4, 4), np.uint8))[..., None], 3, axis=3)  # 32 x 32 x 3
    reps = -(-n // len(images))
    return np.tile(images, (reps, 1, 1, 1))[:n], np.tile(digits.target, reps)[:n].astype(np.int64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loader(data, targets, batch_size):
    """The reference trainer's input pipeline: torchvision PIL transforms, one image at a time."""
    from PIL import Image
    from torchvision import transforms
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(CIFAR10LT.mean, CIFAR10LT.std)])

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(targets)

        def __getitem__(self, i):
            return tf(Image.fromarray(data[i])), int(targets[i])
    return torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)


def bsdist_data(data, targets, batch_size, device, seed=0, world_size=1, rank=0):
    """bsdist's default training data (device loader, batch augmentation); batch_size is per process."""
    ds = ImageArrays(data, targets)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    augment = BatchAugment(len(ds), CIFAR10LT.mean, CIFAR10LT.std, ["RandomCrop", "RandomHorizontalFlip"], 4, seed, device)
    loader = DeviceLoader(ds, ResumableBatchSampler(sampler, batch_size, True), device)
    return Data(loader, sampler, {}, augment, {c: int((targets == c).sum()) for c in range(10)}, 10, 3)


def images_per_second(n_images, seconds):
    return n_images / seconds if seconds > 0 else float("nan")


def bench_data_path(data, targets, batch_size, device, batches):
    ref = reference_loader(data, targets, batch_size)
    it = iter(ref)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        images = images.to(device)
    sync(device)
    ref_rate = images_per_second(batches * batch_size, time.perf_counter() - t0)

    ours = bsdist_data(data, targets, batch_size, device)
    ours.train_sampler.set_epoch(0)
    ours.augment.set_epoch(0)
    it = iter(ours.train)
    images, _, idx = next(it)
    ours.augment(images, idx)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _, idx = next(it)
        x = ours.augment(images, idx)
    sync(device)
    our_rate = images_per_second(batches * batch_size, time.perf_counter() - t0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    return ref_rate, our_rate


def bench_reference_training(data, targets, batch_size, device, steps):
    model = resnet18(10, 3).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    it = iter(reference_loader(data, targets, batch_size))

    def step():
        images, y = next(it)
        loss = loss_fn(model(images.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return images_per_second(steps * batch_size, time.perf_counter() - t0)


def train_state(cfg, model, ddp, data, env, steps):
    """What train_one_epoch needs, as bsdist's run builds it: the config's optimiser and schedule, Balanced Softmax."""
    optimizer = build_optimizer(cfg, model)
    amp = AMP_DTYPES[config.resolve_precision(cfg["TRAIN"]["mixed_precision"], env.device.type)]
    return TrainState(ddp, BalancedSoftmax(list(data.num_per_cls.values())).to(env.device), optimizer,
                      build_scheduler(cfg, optimizer, steps), torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16),
                      amp, cfg["TRAIN"]["grad_accum_steps"])


def bench_bsdist_training(data, targets, batch_size, env, steps, compile_model, precision):
    """Time to the first step and steady images/s through the real train_one_epoch."""
    cfg = config.validate(config.load(None, ["DATASET.batch_size", str(batch_size), "TRAIN.mixed_precision", precision]))
    started = time.perf_counter()
    from bsdist.models import build_model
    model, ddp = build_model(cfg, 10, 3, env.device, compile_model)
    first = bsdist_data(data[:batch_size], targets[:batch_size], batch_size, env.device)
    steady = bsdist_data(data[:batch_size * steps], targets[:batch_size * steps], batch_size, env.device)
    state = train_state(cfg, model, ddp, steady, env, steps)
    amp = state.amp_dtype
    train_one_epoch(state, first, env, NullOutput(), 0, 1, 10**9)
    sync(env.device)
    first_step_s = time.perf_counter() - started
    train_one_epoch(state, steady, env, NullOutput(), 0, 1, 10**9)  # warm: autotuning, allocator, any recompiles
    sync(env.device)
    t0 = time.perf_counter()
    train_one_epoch(state, steady, env, NullOutput(), 1, 2, 10**9)
    sync(env.device)
    rate = images_per_second(steps * batch_size, time.perf_counter() - t0)
    test = DeviceLoader(ImageArrays(data[:4 * batch_size], targets[:4 * batch_size]),
                        ResumableBatchSampler(range(4 * batch_size), batch_size, False), env.device)
    evaluate(ddp.module, test, steady.augment.normalize, 10, [1] * 10, env, amp, batch_size)
    sync(env.device)
    t0 = time.perf_counter()
    evaluate(ddp.module, test, steady.augment.normalize, 10, [1] * 10, env, amp, batch_size)
    sync(env.device)
    eval_rate = images_per_second(4 * batch_size, time.perf_counter() - t0)
    return first_step_s, rate, eval_rate


def matmul_peak_tflops(device, n=8192, repeats=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def train_flops_per_image():
    from torch.utils.flop_counter import FlopCounterMode
    model = resnet18(10, 3)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(1, 3, 32, 32)).sum().backward()
    return counter.get_total_flops()


def grid_minutes(train_rate, eval_rate):
    """The reference grid (2 datasets x 5 factors x 2 losses, BS skipped at 1: 18 runs of 50 epochs)."""
    seconds = 0.0
    for num_classes in (10, 100):
        for factor in GRID_FACTORS:
            runs = 1 if factor == 1 else 2
            images = sum(long_tail_counts(50_000, num_classes, "exp", factor))
            seconds += runs * GRID_EPOCHS * (images / train_rate + TEST_IMAGES / eval_rate)
    return seconds / 60


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--data-batches", type=int, default=10, help="timed batches of the data-path comparison")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    device_type = config.resolve_device(args.device)
    env = init_distributed(device_type, 600)
    on_cuda = env.device.type == "cuda"
    steps = args.steps or (20 if on_cuda else 2)
    bs = args.batch_size
    data, targets = cifar_shaped_digits(max(bs * (args.data_batches + 2), bs * (steps + 1)))
    torch.manual_seed(0)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(env.device) if on_cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": bs}
    try:
        ref_data, our_data = bench_data_path(data, targets, bs, env.device, args.data_batches)
        report["data_path"] = {"reference_img_per_s": ref_data, "bsdist_img_per_s": our_data, "ratio": our_data / ref_data}
        print(f"data path alone (batch {bs}): reference {ref_data:,.0f} img/s | bsdist {our_data:,.0f} img/s | "
              f"{our_data / ref_data:.1f}x", flush=True)

        default_cfg = config.validate(config.defaults())
        precision = config.resolve_precision(default_cfg["TRAIN"]["mixed_precision"], env.device.type)
        ref_train = bench_reference_training(data, targets, bs, env.device, steps)
        first, ours, eval_rate = bench_bsdist_training(data, targets, bs, env, steps, on_cuda, precision)
        report["training"] = {"reference_img_per_s": ref_train, "bsdist_img_per_s": ours, "ratio": ours / ref_train,
                              "bsdist_precision": precision, "bsdist_compiled": on_cuda, "time_to_first_step_s": first,
                              "bsdist_eval_img_per_s": eval_rate}
        print(f"training (batch {bs}): reference-style eager fp32 {ref_train:,.0f} img/s | bsdist default "
              f"({precision}, {'compiled' if on_cuda else 'eager'}) {ours:,.0f} img/s | {ours / ref_train:.2f}x | "
              f"first step after {first:.1f} s | eval {eval_rate:,.0f} img/s", flush=True)
        flops = train_flops_per_image()
        report["train_gflop_per_image"] = flops / 1e9
        if on_cuda:
            peak = matmul_peak_tflops(env.device)
            report["matmul_peak_tflops_bf16"] = peak
            report["training"]["share_of_peak"] = ours * flops / 1e12 / peak
            print(f"measured bf16 matmul peak {peak:.0f} TFLOP/s; bsdist default reaches "
                  f"{100 * report['training']['share_of_peak']:.1f}% ({flops / 1e9:.2f} GFLOP per training image)")
            sweep = []
            for compiled in (False, True):
                for prec in ("bf16", "fp16"):
                    for batch in (128, 512, 1024):
                        _, rate, ev = bench_bsdist_training(data, targets, batch, env, steps, compiled, prec)
                        sweep.append({"compiled": compiled, "precision": prec, "batch_size": batch, "img_per_s": rate,
                                      "share_of_peak": rate * flops / 1e12 / peak, "eval_img_per_s": ev})
                        print(f"  {'compiled' if compiled else 'eager':8s} {prec} batch {batch:5d}: {rate:,.0f} img/s "
                              f"({100 * sweep[-1]['share_of_peak']:.1f}% of peak)", flush=True)
            report["sweep"] = sweep
            best = max(sweep, key=lambda r: r["img_per_s"])
            report["grid_minutes_estimate"] = grid_minutes(best["img_per_s"], best["eval_img_per_s"])
            print(f"reference grid (18 runs x 50 epochs) at the best setting: about {report['grid_minutes_estimate']:.1f} min")
        else:
            report["grid_minutes_estimate"] = grid_minutes(ours, eval_rate)
            print(f"reference grid (18 runs x 50 epochs) on this CPU: about {report['grid_minutes_estimate'] / 60:.0f} h "
                  "(GPU figures need a CUDA device)")
    finally:
        shutdown()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
