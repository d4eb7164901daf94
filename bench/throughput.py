"""Throughput of bsdist's data path and training step against the reference trainer's style.

    python bench/throughput.py [--device auto|cpu|cuda] [--batch-size 512] [--steps 20] [--out bench.json]

Prints, side by side in one run:
- data path alone: reference style (DataLoader + per-image PIL RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize) against bsdist's device loader + batch augmentation;
- training: reference style (that DataLoader, eager fp32 ResNet-18) against bsdist's default
  (device loader, channels_last, TRAIN.mixed_precision default, compile on CUDA) through the real
  `train_one_epoch`; time to the first step;
- on CUDA: the measured bf16 matmul peak and the share of it the training reaches, a sweep of
  eager/compiled x bf16/fp16 x batch 128/512/1024 (each variant compiled afresh and timed over the
  steps it reports);
- an estimate of the reference grid's wall time (18 runs x 50 epochs at the configs' batch 32) from
  batch-32 training and evaluation rates and the per-run start-up, measured in separate processes
  launched like runs; on CUDA with k = 1, 4 and 8 of them side by side on one GPU, the best k used.
The images are scikit-learn's real 8x8 digits scaled to CIFAR's 32x32x3, so the benchmark is offline.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from bsdist import config  # noqa: E402
from bsdist.data import Data, DeviceLoader, ResumableBatchSampler  # noqa: E402
from bsdist.data.augment import BatchAugment  # noqa: E402
from bsdist.data.datasets import CIFAR10LT, ImageArrays  # noqa: E402
from bsdist.data.longtail import long_tail_counts  # noqa: E402
from bsdist.distributed import LAUNCH_VARIABLES, init_distributed, shutdown  # noqa: E402
from bsdist.engine import AMP_DTYPES, TrainState, evaluate, train_one_epoch  # noqa: E402
from bsdist.losses import BalancedSoftmax  # noqa: E402
from bsdist.models import build_model, resnet18  # noqa: E402
from bsdist.optim import build_optimizer, build_scheduler  # noqa: E402
from bsdist.output import NullOutput  # noqa: E402

# The reference grid: CIFAR-10-LT and CIFAR-100-LT at 5 imbalance factors, CE and BS (BS skipped at factor 1),
# 50 epochs at the configs' batch 32, the 10,000 test images evaluated after every epoch at batch 1024.
GRID_EPOCHS, GRID_FACTORS, GRID_BATCH, TEST_IMAGES, TEST_BATCH = 50, (1, 10, 50, 100, 200), 32, 10_000, 1024


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
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
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
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    augment = BatchAugment(len(ds), CIFAR10LT.mean, CIFAR10LT.std, ["RandomCrop", "RandomHorizontalFlip"], 4, seed,
                           device)
    loader = DeviceLoader(ds, ResumableBatchSampler(sampler, batch_size, True), device)
    return Data(loader, sampler, {}, augment, {c: int((targets == c).sum()) for c in range(10)}, 10, 3)


def images_per_second(n_images, seconds):
    return n_images / seconds if seconds > 0 else float("nan")


def bench_data_path(batch_size, device, batches):
    data, targets = cifar_shaped_digits(batch_size * (batches + 1))
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


def bench_reference_training(batch_size, device, steps):
    data, targets = cifar_shaped_digits(batch_size * (steps + 1))
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


def bench_config(batch_size: int, precision: str, env, sync_bn: bool = False, overrides=()) -> config.Config:
    """The default config at a per-process batch, precision and SyncBatchNorm setting (and `KEY.SUB value`
    overrides)."""
    return config.validate(config.load(None, [
        "DATASET.batch_size", str(batch_size * env.world_size), "TRAIN.mixed_precision", precision,
        "TRAIN.device", env.device.type, "MODEL.sync_bn", str(sync_bn).lower(), *overrides]), env.world_size)


def train_state(cfg, module, runnable, data, env, steps_per_epoch, check_every=20):
    """What train_one_epoch needs, as bsdist's run builds it: the config's optimiser and schedule, Balanced Softmax.
    `module` is the plain model (the optimiser's parameters), `runnable` what training calls."""
    optimizer = build_optimizer(cfg, module)
    amp = AMP_DTYPES[config.resolve_precision(cfg.TRAIN.mixed_precision, env.device.type)]
    return TrainState(runnable, BalancedSoftmax(list(data.num_per_cls.values())).to(env.device), optimizer,
                      build_scheduler(cfg, optimizer, steps_per_epoch),
                      torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16), amp,
                      cfg.TRAIN.grad_accum_steps, check_every=check_every)


class Trainer:
    """ResNet-18 built as a run builds it (build_model), training on digits through the real train_one_epoch.

    `batch_size` is per process; an epoch is `steps` optimiser steps. Dynamo is reset first, so a
    compiled Trainer compiles its own graphs (none left from an earlier batch size or precision).
    """

    def __init__(self, batch_size, env, steps, compile_model, precision, sync_bn=False, check_every=20):
        torch._dynamo.reset()
        self.env, self.batch_size, self.steps, self.compiled = env, batch_size, steps, compile_model
        self.started = time.perf_counter()
        self.cfg = bench_config(batch_size, precision, env, sync_bn)
        self.built = build_model(self.cfg, 10, 3, env.device, compile_model, sync_bn)
        images = batch_size * env.world_size
        data, targets = cifar_shaped_digits(images * steps)
        if len(set(targets.tolist())) < 10:
            raise ValueError(f"{images * steps} images do not hold every digit class; "
                             "raise the batch size or the steps")
        shard = dict(world_size=env.world_size, rank=env.rank)
        self.data = bsdist_data(data, targets, batch_size, env.device, **shard)
        self.one_step = bsdist_data(data[:images], targets[:images], batch_size, env.device, **shard)
        self.state = train_state(self.cfg, self.built.module, self.built.train, self.data, env, steps, check_every)
        self.epochs_run = 0

    def epoch(self, data: Data | None = None) -> tuple[float, int]:
        """Train one epoch (of `data`, else the `steps`-step one); return its seconds and optimiser steps."""
        sync(self.env.device)
        before, t0 = self.state.step, time.perf_counter()
        train_one_epoch(self.state, data or self.data, self.env, NullOutput(), self.epochs_run, self.epochs_run + 1,
                        10**9)
        sync(self.env.device)
        self.epochs_run += 1
        return time.perf_counter() - t0, self.state.step - before

    def first_step(self) -> float:
        """One step; the seconds from the start of building the model (compilation included) to its end."""
        self.epoch(self.one_step)
        return time.perf_counter() - self.started

    def timed_rate(self) -> tuple[float, int]:
        """Images/s over all processes of one steady epoch, after a warm one (autotuning, allocator, recompiles)."""
        self.epoch()
        seconds, steps = self.epoch()
        assert steps == self.steps, f"timed {steps} steps, asked for {self.steps}"
        return images_per_second(steps * self.batch_size * self.env.world_size, seconds), steps

    def evaluate(self, batches: int, test_batch: int) -> tuple[float, int]:
        """Seconds and images of one evaluation of `batches` x `test_batch` images through the real evaluate."""
        n = batches * test_batch
        data, targets = cifar_shaped_digits(n)
        loader = DeviceLoader(ImageArrays(data, targets), ResumableBatchSampler(range(n), test_batch, False),
                              self.env.device)
        sync(self.env.device)
        t0 = time.perf_counter()
        evaluate(self.built.compiled, loader, self.data.augment.normalize, 10, [1] * 10, self.env, self.state.amp_dtype,
                 test_batch if self.compiled else None)
        sync(self.env.device)
        return time.perf_counter() - t0, n


@dataclass
class TrainingRate:
    precision: str
    compiled: bool
    batch_size: int
    img_per_s: float
    timed_steps: int
    time_to_first_step_s: float


def bench_bsdist_training(batch_size, env, steps, compile_model, precision) -> TrainingRate:
    """Time to the first step and steady images/s of bsdist's training at one setting."""
    trainer = Trainer(batch_size, env, steps, compile_model, precision)
    first = trainer.first_step()
    rate, timed = trainer.timed_rate()
    return TrainingRate(precision, compile_model, batch_size, rate, timed, first)


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


def sweep_variants():
    """(compiled, precision, batch) of the CUDA sweep, the settings that matter most first."""
    return [(compiled, precision, batch) for compiled in (True, False) for precision in ("bf16", "fp16")
            for batch in (512, 1024, 128)]


# ---- the reference grid's wall time, from runs launched side by side ----

def grid_work() -> tuple[int, int, int]:
    """(training images, evaluated test images, runs) of the whole reference grid."""
    train = runs = 0
    for num_classes in (10, 100):
        for factor in GRID_FACTORS:
            n = 1 if factor == 1 else 2
            runs += n
            train += n * GRID_EPOCHS * sum(long_tail_counts(50_000, num_classes, "exp", factor))
    return train, runs * GRID_EPOCHS * TEST_IMAGES, runs


def file_barrier(directory: str, name: str, index: int, count: int, timeout: float = 600) -> None:
    """Wait until all `count` processes have reached this point (each leaves a file), so that their timed
    parts overlap."""
    open(os.path.join(directory, f"{name}.{index}"), "w").close()
    deadline = time.time() + timeout
    while len(glob.glob(os.path.join(directory, f"{name}.*"))) < count:
        if time.time() > deadline:
            raise TimeoutError(f"the other processes never reached {name}")
        time.sleep(0.005)


def grid_worker(args) -> None:
    """One of k grid-like runs side by side: bsdist's defaults for this device (compiled and bf16 on CUDA)
    at batch 32. It reports its start-up (launch to first step, plus its first evaluation, which compiles
    the evaluation graph) and, in windows shared with the others, its training and evaluation."""
    env = init_distributed(args.device, 600)
    try:
        on_cuda = env.device.type == "cuda"
        trainer = Trainer(GRID_BATCH, env, args.steps, on_cuda, config.resolve_precision("auto", env.device.type))
        trainer.first_step()
        first_step_at = time.time()
        trainer.epoch()  # warm
        first_eval_s, _ = trainer.evaluate(args.eval_batches, args.test_batch)
        report = {"startup_s": first_step_at - args.launched_at + first_eval_s}
        file_barrier(args.grid_worker, "train", args.index, args.count)
        start = time.time()
        _, report["timed_steps"] = trainer.epoch()
        report.update(train_start=start, train_end=time.time(), train_images=report["timed_steps"] * GRID_BATCH)
        file_barrier(args.grid_worker, "eval", args.index, args.count)
        start = time.time()
        _, images = trainer.evaluate(args.eval_batches, args.test_batch)
        report.update(eval_start=start, eval_end=time.time(), eval_images=images)
    finally:
        shutdown()
    with open(os.path.join(args.grid_worker, f"result.{args.index}.json"), "w") as f:
        json.dump(report, f)


def runs_side_by_side(device_type: str, k: int, steps: int, eval_batches: int, test_batch: int, workdir: str,
                      timeout: float = 600) -> dict:
    """Launch k grid workers at once (each a fresh process, like a run; all on the first visible GPU) and
    return their aggregate training and evaluation rates over the shared windows, and their start-up."""
    directory = tempfile.mkdtemp(prefix=f"side-by-side-{k}-", dir=workdir)
    env = {name: value for name, value in os.environ.items() if name not in LAUNCH_VARIABLES}
    launched_at = time.time()
    procs = []
    for i in range(k):
        with open(os.path.join(directory, f"{i}.log"), "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--grid-worker", directory, "--index", str(i),
                 "--count", str(k), "--launched-at", repr(launched_at), "--device", device_type, "--steps", str(steps),
                 "--eval-batches", str(eval_batches), "--test-batch", str(test_batch)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{k} side-by-side processes did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for i, proc in enumerate(procs):
        if proc.returncode != 0:
            with open(os.path.join(directory, f"{i}.log")) as f:
                raise RuntimeError(f"side-by-side process {i} of {k} failed ({proc.returncode}): {f.read()[-2000:]}")
    results = []
    for i in range(k):
        with open(os.path.join(directory, f"result.{i}.json")) as f:
            results.append(json.load(f))

    def aggregate(part):
        window = max(r[f"{part}_end"] for r in results) - min(r[f"{part}_start"] for r in results)
        return images_per_second(sum(r[f"{part}_images"] for r in results), window)
    return {"processes": k, "train_img_per_s": aggregate("train"), "eval_img_per_s": aggregate("eval"),
            "startup_s": max(r["startup_s"] for r in results), "timed_steps": [r["timed_steps"] for r in results],
            "steps": steps, "test_batch": test_batch}


def grid_estimate(side: dict, compiled: bool) -> dict:
    """The reference grid's wall time with `side['processes']` runs side by side, from measured rates:
    training images / aggregate training rate + test images / aggregate evaluation rate + one start-up
    per wave of runs. Assumes k runs in flight throughout (a sweep with --jobs k)."""
    train, test, runs = grid_work()
    if compiled:  # a compiled evaluation pads the last batch to the fixed size
        test = test // TEST_IMAGES * -(-TEST_IMAGES // side["test_batch"]) * side["test_batch"]
    parts = {"training_s": train / side["train_img_per_s"], "evaluation_s": test / side["eval_img_per_s"],
             "startup_s": math.ceil(runs / side["processes"]) * side["startup_s"]}
    return {"processes": side["processes"], "minutes": sum(parts.values()) / 60, **parts}


GRID_INCLUDES = ("training at batch 32 and evaluation at the measured rates, and each run's start-up and compile time "
                 "(launch to first step, plus the first evaluation); not included: data loading from disk, checkpoint "
                 "writes, and the tail of the sweep where fewer than k runs remain")


def measure_grid(device_type: str, ks, steps: int, eval_batches: int, test_batch: int, workdir: str) -> dict:
    """Side-by-side measurements for each k and the estimate from the best of them."""
    compiled = device_type == "cuda"
    measured = [runs_side_by_side(device_type, k, steps, eval_batches, test_batch, workdir) for k in ks]
    estimates = [grid_estimate(m, compiled) for m in measured]
    best = min(estimates, key=lambda e: e["minutes"])
    return {"side_by_side": measured, "estimates": estimates, "best": best, "includes": GRID_INCLUDES}


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def describe_grid(grid: dict) -> str:
    b = grid["best"]
    return (f"reference grid (18 runs x 50 epochs, batch 32, {b['processes']} run(s) side by side): about "
            f"{duration(b['minutes'] * 60)} = training {duration(b['training_s'])} "
            f"+ evaluation {duration(b['evaluation_s'])} + start-up {duration(b['startup_s'])}")


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
