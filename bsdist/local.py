"""A sweep's runs on this machine: each run a process of its own (`python -m bsdist.cli`, or torchrun
with --nproc-per-node), `jobs` at a time, spread over the visible GPUs (nproc-per-node each, through
CUDA_VISIBLE_DEVICES), with TRAIN.resume auto, so that started again the sweep skips finished runs and
resumes the others. Ctrl-C stops every run at its next checkpoint. (bsdist.slurm runs them on SLURM.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bsdist.distributed import LAUNCH_VARIABLES
from bsdist.errors import BsdistError
from bsdist.metrics import describe_best
from bsdist.output import LOG
from bsdist.rundir import finished_results
from bsdist.runlock import RunDirBusy
from bsdist.sweep import Run, check_runs, done_or_held, load_runs, savedir


def command(base: str, run: Run, nproc_per_node: int) -> list[str]:
    if nproc_per_node == 1:
        return [sys.executable, "-m", "bsdist.cli", base, *run.tokens]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "bsdist.cli", base, *run.tokens]


def _last_line(path: str) -> str:
    """The run's own error where its log has one (also inside torchrun's failure summary), else its last line."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line.split("traceback : ", 1)[-1] for line in lines
              if line.startswith(("error: ", "traceback : error: "))]
    plain = [line for line in lines if line.strip("=*-")]  # not one of torchrun's banners
    return (errors or plain or ["(the log is empty)"])[-1][:300]


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (indices or UUIDs); none without CUDA."""
    import torch
    count = torch.cuda.device_count()
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    return names[:count] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(count)]


class GpuSlots:
    """The visible GPUs in groups of nproc_per_node, one group to each run that starts. With more runs
    at once than groups, single-process runs share the least-loaded GPU (several small runs fit on one);
    multi-process runs never share (NCCL cannot put two ranks on one GPU), so they wait for a free group."""

    def __init__(self, gpus: list[str], per_run: int):
        self.groups = [",".join(gpus[i:i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]
        self.load = [0] * len(self.groups)
        self.per_run = per_run

    def available(self) -> bool:
        """Whether a run may start now."""
        return self.per_run == 1 or not self.groups or 0 in self.load

    def take(self) -> str | None:
        """The least-loaded group, as CUDA_VISIBLE_DEVICES names it; None without GPUs."""
        if not self.groups:
            return None
        slot = self.load.index(min(self.load))
        self.load[slot] += 1
        return self.groups[slot]

    def give_back(self, group: str | None) -> None:
        if group is not None:
            self.load[self.groups.index(group)] -= 1


def run_sweep(path: str | None, jobs: int = 1, nproc_per_node: int = 1, overrides: list[str] = (),
              seeds: list[int] | None = None, config_path: str | None = None) -> int:
    """Run every unfinished run of a sweep file (or of config_path with each of seeds) here; 0 when all
    have finished, 1 when any failed (the others still run), 130 when interrupted (Ctrl-C or SIGINT:
    every running run stops with a checkpoint)."""
    base, runs = load_runs(path, config_path, seeds, nproc_per_node, overrides=overrides)
    check_runs(runs)
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)  # each run is a process group of its own

    gpus = visible_gpus()
    if gpus and nproc_per_node > len(gpus) and any(r.uses_gpus for r in runs):
        raise BsdistError(f"--nproc-per-node {nproc_per_node} needs that many GPUs for each run, and {len(gpus)} are "
                          f"visible: use --nproc-per-node {len(gpus)} or fewer")
    slots = GpuSlots(gpus, nproc_per_node)
    # each run is looked at right before it would start (done_or_held): the same sweep started twice, or
    # another process, may have finished it or hold it by then
    total, failed, left, running, pending = len(runs), [], [], [], list(enumerate(runs, 1))
    try:
        _run_all(base, runs, pending, running, failed, left, jobs, nproc_per_node, slots, env)
    except KeyboardInterrupt:
        return _interrupt(running)
    if failed:
        LOG.warning(f"{len(failed)} of {total} runs failed: {', '.join(r.label for r in failed)}; "
                    "run the same command again to resume them")
        return 1
    if left:
        LOG.info(f"{total - len(left)} of {total} runs finished; {', '.join(r.label for r in left)} were held by "
                 "another process (the same sweep started twice?): run the same command again once it has ended")
        return 0
    LOG.info(f"all {total} runs finished; tabulate them with: python launch.py --report {savedir(runs)}")
    return 0


def _interrupt(running: list) -> int:
    """Ctrl-C: every running run stops at its next check point with a checkpoint (SIGTERM); a second
    Ctrl-C stops them at once (SIGINT), their last checkpoint kept. One line, no traceback."""
    LOG.warning(f"sweep interrupted: stopping {len(running)} run(s) at their next checkpoint (Ctrl-C again: at once)")
    signum = signal.SIGTERM
    while True:
        for entry in running:
            if entry[2].poll() is None:
                entry[2].send_signal(signum)
        try:
            for entry in running:
                entry[2].wait()
                entry[3].close()
            break
        except KeyboardInterrupt:
            signum = signal.SIGINT
    stopped = ", ".join(e[1].label for e in running) or "no run was running"
    LOG.warning(f"sweep stopped; {stopped} kept their last checkpoint: run the same command again to resume")
    return 130


def _run_all(base, runs, pending, running, failed, left, jobs, nproc_per_node, slots, env) -> None:
    total = len(runs)
    while pending or running:
        for entry in [e for e in running if e[2].poll() is not None]:
            running.remove(entry)
            i, run, proc, log, started, gpus_of_run = entry
            log.close()
            slots.give_back(gpus_of_run)
            minutes = (time.perf_counter() - started) / 60
            if proc.returncode == 0:
                best = finished_results(run.cfg)["best"]
                LOG.info(f"[{i}/{total}] {run.label}: done in {minutes:.1f} min, {describe_best(best)}")
            elif proc.returncode == RunDirBusy.exit_code:  # another process took the directory first
                left.append(run)
                LOG.info(f"[{i}/{total}] {run.label}: another process took its run directory first; left to it")
            else:
                failed.append(run)
                LOG.info(f"[{i}/{total}] {run.label}: FAILED (exit {proc.returncode}) after {minutes:.1f} min: "
                         f"{_last_line(run.log_path)!r}; see {run.log_path}")
        while pending and len(running) < jobs and (slots.available() or not pending[0][1].uses_gpus):
            i, run = pending.pop(0)
            status = done_or_held(i, run, total)
            if status:
                left += [run] if status == "held" else []
                continue
            os.makedirs(os.path.dirname(run.log_path), exist_ok=True)
            log = open(run.log_path, "a")
            gpus_of_run = slots.take() if run.uses_gpus else None
            run_env = env if gpus_of_run is None else {**env, "CUDA_VISIBLE_DEVICES": gpus_of_run}
            on = "" if gpus_of_run is None else f" on GPU {gpus_of_run}"
            LOG.info(f"[{i}/{total}] {run.label}: started{on}, log {run.log_path}")
            proc = subprocess.Popen(command(base, run, nproc_per_node), stdout=log, stderr=subprocess.STDOUT,
                                    env=run_env)
            running.append((i, run, proc, log, time.perf_counter(), gpus_of_run))
        time.sleep(0.2)
