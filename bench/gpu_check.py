"""What bsdist must do on a GPU that its CPU test suite cannot show, checked in one command.

    python bench/gpu_check.py [--device auto|cpu|cuda] [--out gpu_check.json] [--budget-s 450]

Prints one line per check, `PASS name: detail`, `FAIL name: detail` or `SKIP name: reason`; writes a
JSON file with every check (status, detail, figures, seconds) and the torch / CUDA / driver versions,
the GPUs and the date (rewritten after each check, so a cut-short run leaves what it did); exits 1
when any check fails. Sized for one H100 / H200 in under 8 minutes (the throughput sweep shrinks to
fit --budget-s), and right with up to 8 GPUs visible. `--device cpu` rehearses it without a GPU: the
checks that need CUDA say SKIP and why, after running what of them the CPU can. Nothing is
downloaded: CIFAR-10 files in the official pickle layout are generated into a temporary directory.

 1 environment      CUDA visible, native bf16; torch, CUDA, driver versions; GPU count and names
 2 stop_and_resume  a run stopped by SIGTERM once a mid-epoch last.pt exists and resumed (TRAIN.resume
                    auto) ends like an uninterrupted run: compiled bf16 on CUDA, eager fp32 on CPU (exactly)
 3 resume_elsewhere a checkpoint resumed with fewer GPUs (2 -> 1 via CUDA_VISIBLE_DEVICES), on the CPU
                    (one GPU), or by 1 process (CPU: 2 -> 1)
 4 device_binding   torchrun's LOCAL_RANK r trains on GPU r; with one GPU, NCCL ranks sharing it are
                    refused in one line naming it, and TRAIN.dist_backend gloo lets them share it
 5 fp16_scaler      a short compiled fp16 run (GradScaler) ends with a finite loss
 6 no_host_sync     steady-state steps never wait for the device (torch.cuda.set_sync_debug_mode "error"
                    between the host's read points), compiled bf16 and compiled fp16
 7 sync_bn          2 processes with SyncBatchNorm end with the weights of 1 process at the same global
                    batch; graphs compiled with and without it; its step time
 8 throughput       bench/throughput.py's measurements: training sweep and share of the bf16 matmul peak,
                    evaluation, the reference grid's estimated wall time
 9 checkpoint_cost  what training waits for at a checkpoint (the copy to host memory) against the whole
                    background write, ResNet-18 with momentum
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch
import yaml

# throughput first: it puts the repository root on sys.path
from throughput import (
    Trainer,
    bench_bsdist_training,
    bench_config,
    duration,
    matmul_peak_tflops,
    measure_grid,
    sweep_variants,
    train_flops_per_image,
)

import bsdist.engine as engine
from bsdist import checkpoint
from bsdist.config import resolve_device
from bsdist.data.augment import BatchAugment
from bsdist.distributed import LAUNCH_VARIABLES, DistEnv, all_gather_objects, all_reduce_sum, init_distributed, shutdown
from bsdist.errors import BsdistError
from bsdist.models import create
from bsdist.optim import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from cifar_files import write_cifar  # noqa: E402

RUN_TIMEOUT_S = 300  # one launch.py run, start-up and compilation included
# Generated CIFAR-10 (balanced: the runs use imbalance factor 1) per device: on CUDA enough steps per
# epoch (156 at batch 32) that SIGTERM lands mid-epoch; on 2 CPU cores 6 steps an epoch.
TRAIN_PER_CLASS = {"cuda": 500, "cpu": 20}
TEST_PER_CLASS = {"cuda": 100, "cpu": 10}
SYNC_BN_TOLERANCE = 1e-3  # relative L2 distance of all weights and BatchNorm statistics (measured on CPU: 7e-5)
RESUME_TOLERANCE = 1e-3  # on CUDA, the floor of the resumed run's distance to an uninterrupted one
RESERVE_S = 20  # what the checks after the throughput sweep need of the budget


class Skip(Exception):
    def __init__(self, reason: str, figures: dict | None = None):
        super().__init__(reason)
        self.figures = figures or {}


class CheckFailed(Exception):
    def __init__(self, detail: str, figures: dict | None = None):
        super().__init__(detail)
        self.figures = figures or {}


def require(condition: bool, detail: str, figures: dict | None = None) -> None:
    if not condition:
        raise CheckFailed(detail, figures)


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    gpus: int  # visible GPUs (0 with --device cpu)
    workdir: str
    env: DistEnv  # this process's group of one, for the in-process checks
    deadline: float  # time.time() by which the whole script should be done
    config: str = ""  # the YAML every run starts from (generated CIFAR-10 sized for the device)
    small_config: str = ""  # the same on 200 training images (6 steps an epoch)
    children: list = field(default_factory=list)  # every process started, to end those a failed check leaves behind

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def launch(self, *args, **kwargs) -> "Run":
        """A run started now; on CUDA the caller waits for it later (runs share the GPU and the host's cores),
        on a small CPU it is waited for at once (runs side by side would only slow each other down)."""
        run = Run(self, *args, **kwargs)
        return run if self.cuda else run.wait()


def child_env(extra: dict | None = None) -> dict:
    """This environment without a launcher's rank variables (a child starts its own group), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(extra or {})
    return env


def start_child(ctx: Context, command: list, env: dict | None, logs: str) -> subprocess.Popen:
    """A child in its own session (so that it can be ended with all it starts), stdout and stderr to logs.out / .err."""
    with open(logs + ".out", "w") as out, open(logs + ".err", "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=child_env(env), stdout=out, stderr=err, start_new_session=True)
    ctx.children.append(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """End a child started in its own session, with everything it started (torchrun's workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_lines(text: str, n: int = 3) -> str:
    """The `error:` line bsdist prints, else the last lines: what a failed run said, in one line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return " | ".join(errors[-1:] or lines[-n:])[-600:]


class Run:
    """`python launch.py CONFIG DEFAULT.savedir <workdir>/<name> ...`, under torchrun when nproc > 1.

    Runs of one name share a run directory (a resumed run is a second Run of the same name);
    stdout and stderr go to files in the work directory.
    """

    started = 0

    def __init__(self, ctx: Context, name: str, overrides=(), nproc: int = 1, env: dict | None = None,
                 config: str | None = None):
        Run.started += 1
        self.savedir = os.path.join(ctx.workdir, name)
        self.run_dir = os.path.join(self.savedir, "CIFAR10LT", "resnet18", "check")
        self.what = f"run {name} ({nproc} processes under torchrun)" if nproc > 1 else f"run {name}"
        self.logs = os.path.join(ctx.workdir, f"{Run.started:02d}-{name}")
        prefix = torchrun(nproc) if nproc > 1 else [sys.executable]
        command = [*prefix, "launch.py", config or ctx.config, "DEFAULT.savedir", self.savedir, *overrides]
        self.proc = start_child(ctx, command, env, self.logs)
        self.rc, self.out, self.err = None, "", ""

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> "Run":
        if self.rc is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)
                raise CheckFailed(f"{self.what} did not finish within {timeout:.0f} s") from None
            finally:
                self.rc = self.proc.returncode
                with open(self.logs + ".out") as out, open(self.logs + ".err") as err:
                    self.out, self.err = out.read(), err.read()
        return self

    def succeeded(self) -> "Run":
        self.wait()
        require(self.rc == 0, f"{self.what} exited {self.rc}: {last_lines(self.err)}")
        return self

    def stop_after_checkpoint(self, timeout: float = RUN_TIMEOUT_S) -> str:
        """SIGTERM once last.pt exists (the first mid-epoch checkpoint); the run must stop at a safe point.
        Returns where it stopped, as bsdist said it."""
        path, deadline = os.path.join(self.run_dir, "last.pt"), time.time() + timeout
        while not os.path.exists(path) and self.proc.poll() is None:
            if time.time() > deadline:
                kill_group(self.proc)
                raise CheckFailed(f"{self.what} wrote no last.pt within {timeout:.0f} s")
            time.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
        self.wait()
        said = [line for line in self.err.splitlines() if "stopped by signal 15" in line]
        require(self.rc != 0 and bool(said),
                f"{self.what} did not stop on SIGTERM at a safe point (exit {self.rc}; the run "
                f"may have ended before the signal: give it more steps): {last_lines(self.err)}")
        return said[-1].split("stopped by signal 15 ", 1)[1].split(";")[0]  # "at epoch 1 step 4" / "after epoch 1"

    def weights(self) -> dict:
        return checkpoint.load(os.path.join(self.run_dir, "last.pt"))["model"]

    def results(self) -> dict:
        with open(os.path.join(self.run_dir, "results.json")) as f:
            return json.load(f)


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every floating-point tensor of two state dicts (weights and BatchNorm statistics)."""
    keys = [k for k, v in a.items() if v.is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys)
    return math.sqrt(diff / norm)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def torchrun_worker(ctx: Context, role: str, nproc: int = 2, args=(), env: dict | None = None) -> dict:
    """Run this script's `--worker role` under torchrun; return what rank 0 wrote."""
    logs, result = os.path.join(ctx.workdir, f"worker-{role}"), os.path.join(ctx.workdir, f"worker-{role}.json")
    proc = start_child(ctx, [*torchrun(nproc), os.path.abspath(__file__), "--worker", role, "--device", ctx.device,
                       "--result", result, *args], env, logs)
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise CheckFailed(f"worker {role} on {nproc} processes did not finish within {RUN_TIMEOUT_S} s") from None
    with open(logs + ".err") as err:
        require(proc.returncode == 0,
                f"worker {role} on {nproc} processes exited {proc.returncode}: {last_lines(err.read())}")
    with open(result) as f:
        return json.load(f)


# ---- the checks, in order; each returns (detail, figures) or raises Skip / CheckFailed ----

def check_environment(ctx: Context):
    figures = {"cuda_visible": torch.cuda.is_available(), "gpus": ctx.gpus}
    if not ctx.cuda:
        raise Skip("--device cpu: no GPU in use (versions are in the JSON)", figures)
    names = [torch.cuda.get_device_name(i) for i in range(ctx.gpus)]
    figures.update(names=names, native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    facts = versions()
    described = (f"{ctx.gpus} GPU(s) ({', '.join(sorted(set(names)))}), torch {facts['torch']}, CUDA {facts['cuda']}, "
                 f"driver {facts['driver']}")
    require(figures["native_bf16"], f"{described}: no native bf16, so TRAIN.mixed_precision auto trains in fp16",
            figures)
    return described + ", native bf16", figures


def check_stop_and_resume(ctx: Context):
    precision = (["TRAIN.compile", "true", "TRAIN.mixed_precision", "bf16"] if ctx.cuda
                 else ["TRAIN.mixed_precision", "no"])
    overrides = ["TRAIN.epochs", "2", "TRAIN.ckpt_every_steps", "2", *precision]
    # On CUDA a second uninterrupted run measures how far two runs drift apart anyway (non-deterministic kernels).
    straight = [ctx.launch(name, overrides) for name in (["straight", "straight-again"] if ctx.cuda else ["straight"])]
    stopped_at = Run(ctx, "stopped", overrides).stop_after_checkpoint()
    resumed = Run(ctx, "stopped", overrides).succeeded()
    require("resumed from" in resumed.out, f"the second run did not resume: {last_lines(resumed.out)}")
    reference = straight[0].succeeded()
    ours, theirs = resumed.results()["last"], reference.results()["last"]
    a, b = reference.weights(), resumed.weights()
    figures = {"stopped": stopped_at, "acc": ours["acc"], "acc_uninterrupted": theirs["acc"],
               "loss": ours["loss"], "loss_uninterrupted": theirs["loss"], "weight_distance": relative_distance(a, b)}
    what = f"stopped {stopped_at} by SIGTERM and resumed"
    if not ctx.cuda:
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        require(same and ours == theirs,
                f"{what}, but it ended with other weights or metrics than the uninterrupted run "
                f"(relative weight distance {figures['weight_distance']:.2e})", figures)
        return (f"{what}: eager fp32, 2 epochs; weights and final metrics exactly those of the uninterrupted run",
                figures)
    again = straight[1].succeeded()
    noise = relative_distance(a, again.weights())
    acc_noise = abs(again.results()["last"]["acc"] - theirs["acc"])
    tolerance, acc_tolerance = max(4 * noise, RESUME_TOLERANCE), max(4 * acc_noise, 0.01)
    figures.update(noise_distance=noise, tolerance=tolerance, acc_tolerance=acc_tolerance)
    within = (f"relative weight distance {figures['weight_distance']:.2e} (tolerance max(4 x {noise:.2e} between two "
              f"uninterrupted runs, {RESUME_TOLERANCE:g}) = {tolerance:.2e}); "
              f"test acc {ours['acc']:.4f} vs {theirs['acc']:.4f} (tolerance {acc_tolerance:.3f})")
    require(figures["weight_distance"] <= tolerance and abs(ours["acc"] - theirs["acc"]) <= acc_tolerance,
            f"{what}: outside the tolerance: {within}", figures)
    return f"{what}: compiled bf16, 2 epochs; {within}", figures


def first_visible_gpu() -> str:
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]


def check_resume_elsewhere(ctx: Context):
    if ctx.gpus >= 2:
        what, before, after = "2 GPUs -> 1 GPU", dict(nproc=2), dict(env={"CUDA_VISIBLE_DEVICES": first_visible_gpu()})
    elif ctx.cuda:
        what, before, after = ("1 GPU -> CPU", dict(overrides=["TRAIN.device", "cuda"]),
                               dict(overrides=["TRAIN.device", "cpu"]))
    else:
        what, before, after = "2 CPU processes -> 1", dict(nproc=2), {}
    common = ["TRAIN.epochs", "1", "TRAIN.ckpt_every_steps", "2"]
    stopped_at = Run(ctx, "elsewhere", [*common, *before.pop("overrides", [])], **before).stop_after_checkpoint()
    resumed = Run(ctx, "elsewhere", [*common, *after.pop("overrides", [])], **after).succeeded()
    require("resumed from" in resumed.out, f"{what}: the second run did not resume: {last_lines(resumed.out)}")
    acc = resumed.results()["last"]["acc"]
    return (f"{what}: stopped {stopped_at}, resumed and finished (test acc {acc:.4f})",
            {"stopped": stopped_at, "acc": acc})


def check_device_binding(ctx: Context):
    if not ctx.cuda or ctx.gpus >= 2:
        ranks = torchrun_worker(ctx, "devices")["ranks"]
        figures = {"ranks": ranks}
        seen = ", ".join(f"rank {r['rank']} (LOCAL_RANK {r['local_rank']}) on {r['device']}" for r in ranks)
        if not ctx.cuda:
            raise Skip(f"needs CUDA (rehearsed on CPU: torchrun started 2 ranks, {seen})", figures)
        distinct = len({r["uuid"] for r in ranks}) == len(ranks)
        require(distinct and all(r["device"] == f"cuda:{r['local_rank']}" for r in ranks),
                f"torchrun's ranks are not each on the GPU of their LOCAL_RANK: {seen}", figures)
        uuids = ", ".join(r["uuid"] for r in ranks)
        return f"{seen}: two distinct GPUs ({uuids}); an NCCL all-reduce across them worked", figures
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    refused = Run(ctx, "one-gpu-nccl", ["TRAIN.dist_backend", "auto"], nproc=2)
    shared = Run(ctx, "one-gpu-gloo", ["TRAIN.dist_backend", "gloo"], nproc=2)
    refused.wait()
    naming = [line for line in refused.err.splitlines() if "share one GPU" in line]
    figures = {"uuid": uuid, "refused_exit": refused.rc, "refusal": naming}
    require(refused.rc != 0 and len(naming) == 1 and uuid in naming[0],
            f"2 NCCL ranks on one GPU were not refused in one line naming {uuid} (exit {refused.rc}): "
            f"{last_lines(refused.err)}",
            figures)
    shared.succeeded()
    require("2 process(es) on cuda" in shared.out,
            f"the gloo run did not train 2 processes on the GPU: {last_lines(shared.out)}")
    return (f"one GPU: NCCL refused in one line ({naming[0].strip()[:120]}...); TRAIN.dist_backend gloo trained "
            "2 processes on it", figures)


def check_fp16_scaler(ctx: Context):
    if not ctx.cuda:
        raise Skip("needs CUDA: fp16 autocast on this CPU is emulated and about 15x slower than fp32")
    run = Run(ctx, "fp16", ["TRAIN.mixed_precision", "fp16", "TRAIN.compile", "true"]).succeeded()
    with open(os.path.join(run.run_dir, "metrics.csv")) as f:
        losses = [float(line.split(",")[2]) for line in f.read().splitlines()[1:]]
    test_loss = run.results()["last"]["loss"]
    figures = {"train_loss": losses, "test_loss": test_loss}
    require(bool(losses) and all(math.isfinite(x) for x in [*losses, test_loss]), f"non-finite loss: {figures}",
            figures)
    return f"compiled fp16 with GradScaler, 1 epoch: train loss {losses[-1]:.4f}, test loss {test_loss:.4f}", figures


class SyncGuard:
    """CUDA's sync debug mode at "error" for the device work of training steps, off around the host's reads.

    It goes on after the first optimiser step (and at each later micro-batch's augmentation) and off
    just before each read point (engine.agree, DeviceTally.read_loss), where it stays until the next
    micro-batch: the epoch's last read is followed by the epoch's `.item()`. On CPU the same wrappers run
    and count, with nothing to switch.
    """

    def __init__(self, cuda: bool):
        self.cuda, self.armed, self.on = cuda, False, False
        self.counts = {"steps_checked": 0, "agree": 0, "read_loss": 0}

    def switch(self, on: bool) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error" if on else "default")
        self.on = on

    @contextlib.contextmanager
    def installed(self):
        step, agree, read_loss, augment = (engine.optimizer_step, engine.agree, engine.DeviceTally.read_loss,
                                           BatchAugment.__call__)
        guard = self

        def guarded_step(*args, **kwargs):
            guard.counts["steps_checked"] += guard.on  # this step's forward and backward ran with the mode on
            step(*args, **kwargs)
            guard.armed = True
            guard.switch(True)

        def guarded_agree(*args, **kwargs):
            guard.switch(False)
            guard.counts["agree"] += 1
            return agree(*args, **kwargs)

        def guarded_read_loss(tally):
            guard.switch(False)
            guard.counts["read_loss"] += 1
            return read_loss(tally)

        def guarded_augment(self_, *args):
            if guard.armed:
                guard.switch(True)
            return augment(self_, *args)
        engine.optimizer_step, engine.agree, engine.DeviceTally.read_loss = (guarded_step, guarded_agree,
                                                                             guarded_read_loss)
        BatchAugment.__call__ = guarded_augment
        try:
            yield self
        finally:
            self.switch(False)
            engine.optimizer_step, engine.agree, engine.DeviceTally.read_loss = step, agree, read_loss
            BatchAugment.__call__ = augment


def steps_without_sync(ctx: Context, precision: str, compiled: bool, batch: int, steps: int, check_every: int) -> dict:
    """One warm-up epoch, then one epoch under SyncGuard; the first synchronising call, if any."""
    trainer = Trainer(batch, ctx.env, steps, compiled, precision, check_every=check_every)
    trainer.epoch()
    guard = SyncGuard(ctx.cuda)
    error = None
    with guard.installed():
        try:
            trainer.epoch()
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            package = os.path.join(ROOT, "bsdist") + os.sep
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(package)][-2:]
            where = " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} ({f.line})" for f in frames)
            error = f"{str(e).strip().splitlines()[0][:200]}" + (f" at {where}" if where else "")
    return {**guard.counts, "error": error, "steps": steps, "batch": batch}


def check_no_host_sync(ctx: Context):
    variants = ({"compiled bf16": ("bf16", True), "compiled fp16": ("fp16", True)} if ctx.cuda
                else {"eager fp32": ("no", False)})
    size = dict(batch=32, steps=60, check_every=20) if ctx.cuda else dict(batch=8, steps=6, check_every=2)
    results = {name: steps_without_sync(ctx, precision, compiled, **size)
               for name, (precision, compiled) in variants.items()}
    counted = "; ".join(f"{name}: {r['steps_checked']} of {r['steps']} steps checked, {r['agree']} agreement and "
                        f"{r['read_loss']} loss reads with the mode off" for name, r in results.items())
    hooks_hit = all(r["steps_checked"] > 0 and r["agree"] > 0 and r["read_loss"] > 0 for r in results.values())
    require(hooks_hit, f"the guard's wrappers were not all called (engine's names changed?): {counted}", results)
    if not ctx.cuda:
        raise Skip(f"torch.cuda.set_sync_debug_mode needs CUDA; the same code path rehearsed on CPU ({counted})",
                   results)
    failed = {name: r["error"] for name, r in results.items() if r["error"]}
    require(not failed, f"a steady-state step synchronised with the host: {failed}", results)
    return f"no synchronising call inside the steps ({counted})", results


def check_sync_bn(ctx: Context):
    backend = "auto" if ctx.gpus >= 2 else "gloo"  # one GPU: 2 processes share it through gloo
    fp32 = {"NVIDIA_TF32_OVERRIDE": "0"} if ctx.cuda else None  # fp32 means fp32: no TF32 convolutions or matmuls
    common = ["TRAIN.mixed_precision", "no", "TRAIN.compile", "false", "TRAIN.dist_backend", backend,
              # a small step keeps ResNet-18's fp32 noise from growing
              "OPTIMIZER.lr", "0.01", "OPTIMIZER.momentum", "0.0"]
    runs = {name: ctx.launch(f"bn-{name.replace(' ', '-')}", [*common, *extra], nproc=nproc, env=fp32,
                             config=ctx.small_config)
            for name, nproc, extra in [("one process", 1, []), ("synchronised", 2, ["MODEL.sync_bn", "true"]),
                                       ("per process", 2, ["MODEL.sync_bn", "false"])]}
    weights = {name: run.succeeded().weights() for name, run in runs.items()}
    synced = relative_distance(weights["one process"], weights["synchronised"])
    per_process = relative_distance(weights["one process"], weights["per process"])
    measured = torchrun_worker(ctx, "sync-bn", args=["--backend", backend], env=fp32)
    figures = {"distance_synchronised": synced, "distance_per_process": per_process, "tolerance": SYNC_BN_TOLERANCE,
               "backend": backend if ctx.gpus < 2 else "nccl", **measured}
    graphs, steps = measured["graphs"], measured["step_ms"]
    detail = (f"2 processes ({figures['backend']}) vs 1, resnet18 fp32 eager, global batch 32: "
              f"relative weight distance {synced:.1e} with SyncBatchNorm, {per_process:.1e} without "
              f"(tolerance {SYNC_BN_TOLERANCE:g} and below a tenth of the latter); "
              f"graphs compiled {graphs['off']} without, {graphs['on']} with ({graphs['breaks_on']} graph breaks); "
              f"eager step {steps['off']:.0f} ms without, {steps['on']:.0f} ms with "
              f"({ctx.device}, batch {measured['batch_per_process']} per process)")
    require(synced <= SYNC_BN_TOLERANCE and synced < 0.1 * per_process, detail, figures)
    return detail, figures


def setting(compiled: bool, precision: str, batch: int) -> str:
    return f"{'compiled' if compiled else 'eager'} {'fp32' if precision == 'no' else precision} batch {batch}"


def check_throughput(ctx: Context):
    """bench/throughput.py's measurements, the ones the targets are about first, the rest while the budget lasts."""
    if ctx.cuda:
        variants, steps, grid_args = sweep_variants(), 20, ((1, 4, 8), 200, 10, 1024)
    else:  # a reduced rehearsal of the same code: one eager fp32 variant, one batch-32 run for the grid estimate
        variants, steps, grid_args = [(False, "no", 8)], 2, ((1,), 1, 1, 16)
    flops = train_flops_per_image()
    peak = matmul_peak_tflops(ctx.env.device) if ctx.cuda else None
    figures = {"matmul_peak_tflops_bf16": peak, "train_gflop_per_image": flops / 1e9, "sweep": [], "grid": None,
               "left_out_for_time": []}
    compile_s = 60.0  # a first guess at what one compiled variant costs; then the last one's measured cost

    def measure(compiled, precision, batch):
        nonlocal compile_s
        if ctx.left() - RESERVE_S < (compile_s if compiled else 15):
            figures["left_out_for_time"].append(setting(compiled, precision, batch))
            return
        started = time.time()
        r = bench_bsdist_training(batch, ctx.env, steps, compiled, precision)
        compile_s = time.time() - started if compiled else compile_s
        figures["sweep"].append({**vars(r), "share_of_peak": r.img_per_s * flops / 1e12 / peak if peak else None})

    for variant in variants[:2]:  # compiled bf16 at batch 512 and 1024: the peak-share target
        measure(*variant)
    if ctx.left() - RESERVE_S > 60:
        figures["grid"] = measure_grid(ctx.device, *grid_args, ctx.workdir)
    else:
        figures["left_out_for_time"].append("reference grid estimate")
    for variant in variants[2:]:
        measure(*variant)
    rates = sorted(figures["sweep"], key=lambda v: -v["img_per_s"])
    parts = [f"best {setting(v['compiled'], v['precision'], v['batch_size'])}: {v['img_per_s']:,.0f} img/s over "
             f"{v['timed_steps']} timed steps" for v in rates[:1]]
    big = [v["share_of_peak"] for v in rates if v["batch_size"] >= 512]
    if peak and big:
        parts.append(f"best share of the measured {peak:.0f} TFLOP/s bf16 matmul peak at batch >= 512: "
                     f"{100 * max(big):.1f}% (target 40%)")
    if figures["grid"]:
        grid = figures["grid"]
        parts.append(f"evaluation {grid['side_by_side'][0]['eval_img_per_s']:,.0f} img/s (batch {grid_args[3]})")
        parts.append(f"reference grid about {duration(grid['best']['minutes'] * 60)} with {grid['best']['processes']} "
                     "run(s) side by side (target 10 min on one GPU)")
    if figures["left_out_for_time"]:
        parts.append(f"left out for time: {', '.join(figures['left_out_for_time'])}")
    if not ctx.cuda:
        raise Skip(f"needs CUDA; rehearsed reduced on CPU: {'; '.join(parts)}", figures)
    require(bool(big) and figures["grid"] is not None, f"the budget ran out before the figures the targets are about "
            f"(rerun with a larger --budget-s): {'; '.join(parts)}", figures)
    return "; ".join(parts), figures


def check_checkpoint_cost(ctx: Context):
    cfg = bench_config(32, "no", ctx.env, overrides=["OPTIMIZER.momentum", "0.9"])
    model = create(cfg, 10, 3, ctx.env.device, sync_bn=False)
    optimizer = build_optimizer(cfg, model)  # momentum buffers: a second model's worth
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
    path = os.path.join(ctx.workdir, "cost.pt")
    writer, copies, writes = checkpoint.CheckpointWriter(), [], []
    for _ in range(3):
        started = time.perf_counter()
        writer.save(state, [path])  # returns once the copy to host memory is made: all training waits for
        copies.append(time.perf_counter() - started)
        writer.wait()
        writes.append(time.perf_counter() - started)
    loaded = checkpoint.load(path)
    figures = {"host_copy_s": statistics.median(copies), "full_write_s": statistics.median(writes),
               "megabytes": os.path.getsize(path) / 2**20}
    require(all(torch.equal(loaded["model"][k], v.cpu()) for k, v in state["model"].items()),
            "the written checkpoint differs")
    detail = (f"ResNet-18 with momentum ({figures['megabytes']:.0f} MB on {ctx.device}): training waits "
              f"{1000 * figures['host_copy_s']:.0f} ms for the host copy; the background write takes "
              f"{1000 * figures['full_write_s']:.0f} ms in all (median of 3)")
    require(figures["host_copy_s"] < figures["full_write_s"], f"{detail}: the copy is not cheaper than the write",
            figures)
    return detail, figures


CHECKS = [check_environment, check_stop_and_resume, check_resume_elsewhere, check_device_binding, check_fp16_scaler,
          check_no_host_sync, check_sync_bn, check_throughput, check_checkpoint_cost]


# ---- workers started under torchrun by the checks ----

def worker_devices(args, env: DistEnv) -> dict:
    """Each rank's LOCAL_RANK, device and GPU UUID, after a device all-reduce (NCCL on CUDA) across them."""
    total = all_reduce_sum(torch.ones(1, device=env.device))
    mine = {"rank": env.rank, "local_rank": env.local_rank, "device": str(env.device),
            "uuid": str(torch.cuda.get_device_properties(env.device).uuid) if env.device.type == "cuda" else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return {"ranks": all_gather_objects(mine), "all_reduce": total.item()}


def worker_sync_bn(args, env: DistEnv) -> dict:
    """Graphs dynamo compiles for bsdist's model with and without SyncBatchNorm (built by build_model, compiled with
    the cheap aot_eager backend: the graph splits are dynamo's, whatever the backend), and eager step times."""
    batch, steps = (16, 50) if env.device.type == "cuda" else (8, 3)
    counters = torch._dynamo.utils.counters
    graphs, breaks, step_ms = {}, {}, {}
    for sync_bn, key in ((False, "off"), (True, "on")):
        compile_cheaply = functools.partial(torch.compile, backend="aot_eager")
        with patched(torch, "compile", compile_cheaply):
            trainer = Trainer(batch, env, steps, True, "no", sync_bn=sync_bn)  # resets dynamo
            counters.clear()
            trainer.first_step()
        graphs[key] = counters["aot_autograd"]["total"]
        breaks[key] = sum(counters["graph_break"].values())
        if key == "on":
            graphs["break_reasons"] = sorted(counters["graph_break"], key=lambda r: -counters["graph_break"][r])[:3]
        trainer = Trainer(batch, env, steps, False, "no", sync_bn=sync_bn)
        trainer.epoch()
        seconds, timed = trainer.epoch()
        step_ms[key] = 1000 * seconds / timed
    graphs.update(breaks_off=breaks["off"], breaks_on=breaks["on"])
    return {"graphs": graphs, "step_ms": step_ms, "batch_per_process": batch, "timed_steps": steps}


@contextlib.contextmanager
def patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


WORKERS = {"devices": worker_devices, "sync-bn": worker_sync_bn}


def run_worker(args) -> None:
    env = init_distributed(args.device, 300, args.backend)
    try:
        result = WORKERS[args.worker](args, env)
        if env.rank == 0:
            with open(args.result, "w") as f:
                json.dump(result, f)
    finally:
        shutdown(wait_for=env)


# ---- the report ----

def versions() -> dict:
    facts = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "driver": None, "python": platform.python_version(), "host": platform.node(),
             "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    return facts


def run_check(check, ctx: Context) -> dict:
    name = check.__name__.removeprefix("check_")
    started = time.perf_counter()
    figures = {}
    try:
        detail, figures = check(ctx)
        status = "PASS"
    except Skip as e:
        status, detail, figures = "SKIP", str(e), e.figures
    except CheckFailed as e:
        status, detail, figures = "FAIL", str(e), e.figures
    except Exception as e:  # noqa: BLE001 - a broken check is a failed check; the others still run
        status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip()[:600]}"
        figures = {"traceback": traceback.format_exc()[-4000:]}
    finally:
        for proc in ctx.children:  # what a failed check left running would hold the GPU during the next ones
            kill_group(proc)
        ctx.children.clear()
    print(f"{status} {name}: {detail}", flush=True)
    return {"name": name, "status": status, "detail": detail, "figures": figures,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall time the script aims to stay within: the throughput sweep shrinks to fit "
                             "(default 450 on CUDA, none on CPU)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args) or 0
    started = time.time()
    report = {**versions(), "device": args.device, "checks": []}

    def write():
        report["wall_s"] = round(time.time() - started, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    try:
        device = resolve_device(args.device)
    except BsdistError as e:
        report["checks"].append({"name": "environment", "status": "FAIL", "detail": str(e), "figures": {},
                                 "seconds": 0})
        print(f"FAIL environment: {e}")
        write()
        return 1
    report["device"] = device
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        budget = args.budget_s or (450 if device == "cuda" else math.inf)
        ctx = Context(device, torch.cuda.device_count() if device == "cuda" else 0, workdir,
                      init_distributed(device, 600), started + budget)
        try:
            ctx.config = write_run_config(workdir, "cifar", TRAIN_PER_CLASS[device], TEST_PER_CLASS[device])
            ctx.small_config = write_run_config(workdir, "cifar-small", TRAIN_PER_CLASS["cpu"], TEST_PER_CLASS["cpu"])
            for check in CHECKS:
                report["checks"].append(run_check(check, ctx))
                write()
        finally:
            shutdown()
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    write()
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {report['wall_s']:.0f} s "
          f"on {device}; wrote {args.out}")
    return 1 if counts["FAIL"] else 0


def write_run_config(workdir: str, name: str, train_per_class: int, test_per_class: int) -> str:
    """Generated CIFAR-10 files and the YAML the check runs start from (their overrides come on top)."""
    root = write_cifar(os.path.join(workdir, name), 10, train_per_class=train_per_class,
                       test_counts=[test_per_class] * 10)
    cfg = {"DEFAULT": {"exp_name": "check"},
           "DATASET": {"name": "CIFAR10LT", "datadir": root, "batch_size": 32, "num_workers": 0, "imbalance_factor": 1},
           "OPTIMIZER": {"lr": 0.1, "momentum": 0.9},
           "SCHEDULER": {"params": {"warmup_epochs": 0}},
           "TRAIN": {"epochs": 1, "log_interval": 1000, "check_every_steps": 1, "compile": False,
                     "mixed_precision": "auto", "resume": "auto"}}
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


if __name__ == "__main__":
    sys.exit(main())
