"""The reference grid's wall time, from k grid-like runs launched side by side (each a fresh
`bench/throughput.py --grid-worker` process, timed over windows they share) and the grid's work."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from timing import ROOT
from timing.data_path import images_per_second
from timing.training import TimedTrainer

from bsdist import config
from bsdist.data.longtail import long_tail_counts
from bsdist.distributed import LAUNCH_VARIABLES, init_distributed, shutdown

# The reference grid: CIFAR-10-LT and CIFAR-100-LT at 5 imbalance factors, CE and BS (BS skipped at factor 1),
# 50 epochs at the configs' batch 32, the 10,000 test images evaluated after every epoch at batch 1024.
GRID_EPOCHS, GRID_FACTORS, GRID_BATCH, TEST_IMAGES, TEST_BATCH = 50, (1, 10, 50, 100, 200), 32, 10_000, 1024
THROUGHPUT = os.path.join(ROOT, "bench", "throughput.py")  # the script a side-by-side run is started as


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
        trainer = TimedTrainer(GRID_BATCH, env, args.steps, on_cuda,
                               config.resolve_precision("auto", env.device.type))
        trainer.first_step()  # its epoch warms the training up
        first_step_at = trainer.first_step_at
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
                [sys.executable, THROUGHPUT, "--grid-worker", directory, "--index", str(i),
                 "--count", str(k), "--launched-at", repr(launched_at), "--device", device_type, "--steps", str(steps),
                 "--eval-batches", str(eval_batches), "--test-batch", str(test_batch)],
                env=env, stdout=log, stderr=subprocess.STDOUT))  # in this session: ending it ends them
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{k} side-by-side processes did not finish within {timeout:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
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


def measure_grid(device_type: str, ks, steps: int, eval_batches: int, test_batch: int, workdir: str,
                 timeout: float = 600) -> dict:
    """Side-by-side measurements for each k (each within `timeout`) and the estimate from the best of them."""
    compiled = device_type == "cuda"
    measured = [runs_side_by_side(device_type, k, steps, eval_batches, test_batch, workdir, timeout) for k in ks]
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
