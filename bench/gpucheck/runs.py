"""What the checks run on: their context and outcomes, the child processes they start (launch.py runs,
alone or under torchrun, and gpu_check.py's own `--worker ROLE` under torchrun) and the YAML those runs
start from, on CIFAR-10 files generated in the work directory."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

# timing first: it puts the repository root on sys.path
from timing import ROOT

from bsdist import checkpoint
from bsdist.distributed import LAUNCH_VARIABLES, DistEnv

sys.path.insert(0, os.path.join(ROOT, "tests"))
from cifar_files import write_cifar  # noqa: E402

RUN_TIMEOUT_S = 300  # one launch.py run, start-up and compilation included
GPU_CHECK = os.path.join(ROOT, "bench", "gpu_check.py")  # the script torchrun_worker starts with --worker


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
    proc = start_child(ctx, [*torchrun(nproc), GPU_CHECK, "--worker", role, "--device", ctx.device,
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
