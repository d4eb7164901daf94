"""SLURM: the same main(cfg) that torchrun runs, submitted through submitit.

    launch.py [CONFIG] --slurm --partition gpu [--nodes N --gpus-per-node G ...] [KEY.SUB value ...]
    launch.py --sweep SWEEP.yaml --slurm --partition gpu      (one job array, a run per array task)

The launcher validates the config, submits, prints the job id, the log paths and the run directory,
and returns (`--wait` waits and prints the results). Each SLURM task exports the rendezvous variables
from submitit's job environment and then joins the process group like any torchrun worker.

Preemption and time limits: on USR2 (sent `--signal-delay-s` before the time limit, or by the cluster
on preemption) every rank stops at the next optimiser step with a checkpoint, then submitit requeues
the job. The requeued task resolves the run directory's latest checkpoint when it starts, so a job
preempted mid-way ends with the results of one that was not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import time

from bsdist import config
from bsdist.config import Config
from bsdist.errors import BsdistError, Stopped
from bsdist.output import LOG

PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's signal for "checkpoint and requeue" (NCCL may use USR1)


def add_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Add --slurm and its flags; return the flags' names (argparse dests), --slurm's own aside."""
    g = parser.add_argument_group("SLURM (with --slurm; sbatch's names and meanings)")
    g.add_argument("--slurm", action="store_true", help="submit to SLURM through submitit instead of running here")
    flags = [
        g.add_argument("--partition", help="partition to run on (default: the cluster's default partition)"),
        g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)"),
        g.add_argument("--gpus-per-node", type=int,
                       help="GPUs per node, one task per GPU (default 1; 0 when TRAIN.device is cpu)"),
        g.add_argument("--ntasks-per-node", type=int,
                       help="tasks per node on CPU-only partitions (default: one per GPU, else 1)"),
        g.add_argument("--cpus-per-task", type=int, help="CPUs per task (default DATASET.num_workers + 1)"),
        g.add_argument("--mem-gb", type=int, help="memory per node in GB (default: the partition's default)"),
        g.add_argument("--timeout-min", type=int, default=720, help="time limit per job in minutes (default 720)"),
        g.add_argument("--signal-delay-s", type=int, default=120,
                       help="send USR2 this long before the time limit: checkpoint and requeue (default 120)"),
        g.add_argument("--account"),
        g.add_argument("--qos"),
        g.add_argument("--constraint"),
        g.add_argument("--exclude", help="nodes not to use"),
        g.add_argument("--job-name", help="default: bsdist-<run name>"),
        g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm-extra reservation=mine (repeatable)"),
        g.add_argument("--wait", action="store_true", help="wait for the job and print its results"),
    ]
    return [action.dest for action in flags]


def tasks_per_node(args, cfg: Config) -> int:
    gpus = _gpus_per_node(args, cfg)
    if gpus and args.ntasks_per_node not in (None, gpus):
        if args.gpus_per_node is None:  # the default: one GPU, as TRAIN.device is not cpu
            raise BsdistError(f"--ntasks-per-node {args.ntasks_per_node} asks for CPU tasks, but TRAIN.device "
                              f"{cfg.TRAIN.device} gives each task a GPU (one by default): set TRAIN.device cpu (or "
                              f"--gpus-per-node 0) for CPU tasks, or --gpus-per-node {args.ntasks_per_node} "
                              f"for GPU tasks")
        raise BsdistError(f"--ntasks-per-node {args.ntasks_per_node} disagrees with --gpus-per-node {gpus}: "
                          "bsdist runs one task per GPU; drop --ntasks-per-node")
    return gpus or args.ntasks_per_node or 1


def _gpus_per_node(args, cfg: Config) -> int:
    if args.gpus_per_node is not None:
        return args.gpus_per_node
    return 0 if cfg.TRAIN.device == "cpu" else 1


def check_arguments(args) -> None:
    """Flags alone, before any config is read."""
    for name in ("nodes", "ntasks_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BsdistError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        raise BsdistError(f"--gpus-per-node must be 0 or more, got {args.gpus_per_node}")
    if args.signal_delay_s < 0:
        raise BsdistError(f"--signal-delay-s must be 0 or more, got {args.signal_delay_s}")
    for extra in args.slurm_extra:
        key = extra.split("=", 1)[0]
        if "=" not in extra or not key or key.startswith("-"):
            raise BsdistError(f"--slurm-extra {extra!r} must be KEY=VALUE with sbatch's long option name and no "
                              "dashes, e.g. --slurm-extra reservation=mine")


def world_size(args, cfg: Config) -> int:
    return args.nodes * tasks_per_node(args, cfg)


def executor_parameters(args, cfg: Config, job_name: str) -> dict:
    """submitit.SlurmExecutor parameters (sbatch's options) for these flags."""
    gpus = _gpus_per_node(args, cfg)
    params = {"job_name": args.job_name or job_name, "nodes": args.nodes, "ntasks_per_node": tasks_per_node(args, cfg),
              "cpus_per_task": args.cpus_per_task or cfg.DATASET.num_workers + 1, "time": args.timeout_min,
              "signal_delay_s": args.signal_delay_s,
              # a task that dies ends the job at once: under NCCL its peers would otherwise wait in a collective
              # until TRAIN.dist_timeout_s (srun sends them SIGTERM, then SIGKILL after the cluster's KillWait)
              "srun_args": ["--kill-on-bad-exit=1"],
              "additional_parameters": dict(extra.split("=", 1) for extra in args.slurm_extra)}
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    for name in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    return params


def submission_folder(parent: str) -> str:
    """A new folder for one submission's scripts, pickles and logs: SLURM job ids restart when a
    cluster's state is wiped, so folders are named by time and a random suffix, never reused."""
    return os.path.join(parent, "slurm", time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3))


class SlurmTask:
    """What every SLURM task runs. submitit pickles it; on USR2 its checkpoint() hands submitit a
    fresh copy to requeue, which resumes from the run directory's latest checkpoint when it starts."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self) -> dict:
        import submitit

        from bsdist.train import main
        # keep CUDA_VISIBLE_DEVICES as SLURM set it; init_distributed picks the device from LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            return main(self.cfg)
        except Stopped as e:
            if e.signum != PREEMPT_SIGNAL:
                raise
        # Every rank stopped at the same step and last.pt is on disk: now let submitit's own handler
        # requeue (on global rank 0; it exits). Other ranks leave without a result: the job goes on.
        handler = signal.getsignal(PREEMPT_SIGNAL)
        if callable(handler):
            handler(PREEMPT_SIGNAL, None)
        raise SystemExit(0)

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(SlurmTask(self.cfg))


def _executor(folder: str, params: dict):
    if shutil.which("sbatch") is None:
        raise BsdistError("sbatch not found: --slurm submits from a machine of a SLURM cluster; run it on a login "
                          "node, or start a local cluster with slurm/dev-cluster.sh up")
    try:
        import submitit
    except ImportError:
        raise BsdistError("--slurm needs submitit: pip install submitit") from None
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor


def _submitted(folder: str, params: dict, submit):
    """submit(an executor writing to folder), or one clear error with nothing left behind: no folder,
    no run directory."""
    created = folder
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    executor = _executor(folder, params)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; the error below says it once
            return submit(executor)
    except Exception as e:  # submitit raises its own error types with sbatch's stderr inside
        shutil.rmtree(created, ignore_errors=True)
        lines = [line.strip() for line in str(e).splitlines() if "error:" in line or "fatal:" in line]
        said = ((lines[-1] if lines else str(e).strip().splitlines()[-1][:200])
                .removeprefix("sbatch: ").removeprefix("error: "))
        hint = (f" (--partition {params.get('partition', 'not given')}); sinfo lists the partitions"
                if "partition" in said.lower() else
                "; is SLURM_CONF set (slurm/dev-cluster.sh env prints it for the local cluster)?"
                if "configuration" in said else "")
        raise BsdistError(f"sbatch refused the job: {said}{hint}") from None


def _logs(job) -> str:
    return f"{job.paths.stdout} and {job.paths.stderr}"


def submit(args, cfg: Config) -> int:
    """Submit one run; return at once (0), or with --wait once it ended (0 on success)."""
    from bsdist.metrics import describe_best
    from bsdist.rundir import finished_results, resume_checkpoint
    from bsdist.runlock import check_free
    resume_checkpoint(cfg)  # a directory that holds another run refuses before anything is submitted
    run_dir = config.run_dir(cfg)
    check_free(run_dir)  # and so does one that a run is writing now
    if finished_results(cfg) is not None:
        LOG.info(f"run already finished; results in {run_dir}/results.json (nothing submitted)")
        return 0
    folder = submission_folder(run_dir)
    params = executor_parameters(args, cfg, "bsdist-" + os.path.basename(run_dir))
    job = _submitted(folder, params, lambda executor: executor.submit(SlurmTask(cfg)))
    LOG.info(f"submitted job {job.job_id}: {args.nodes} node(s) x {tasks_per_node(args, cfg)} task(s); "
          f"run directory {run_dir}; logs {_logs(job)}")
    if not args.wait:
        LOG.info(f"follow it with: squeue -j {job.job_id}; tensorboard --logdir {run_dir}")
        return 0
    results = wait_for(job, run_dir)
    LOG.info(f"job {job.job_id} done: {describe_best(results['best'])}; results in {run_dir}/results.json")
    return 0


# Pending reasons SLURM keeps for ever: the request exceeds what the partition, its nodes or the account allow.
HOPELESS = {"PartitionConfig": "the request exceeds what the partition's nodes offer (CPUs, memory, GPUs per node)",
            "PartitionNodeLimit": "more nodes than the partition allows",
            "PartitionTimeLimit": "a longer time than the partition allows",
            "BadConstraints": "constraints no node satisfies", "InvalidAccount": "an unknown account",
            "InvalidQOS": "an unknown QOS"}


def pending_reason(job_id: str) -> str | None:
    """Why SLURM holds the job pending (squeue's reason), or None when it is not pending or squeue cannot say."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-t", "PENDING", "-o", "%r"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def wait_for(job, run_dir: str | None = None) -> dict:
    """Rank 0's results once every task ended; a failed, cancelled or timed-out job, or one SLURM can never
    start, is one clear error."""
    from submitit.core.utils import FailedJobError, UncompletedJobError
    started = time.monotonic()
    # ask sacct at least every 10 s: submitit's own polling backs off to 10 minutes, so a job cancelled
    # late in a long run would be noticed that much later
    while not all(job.task(i).done(force_check=True) for i in range(job.num_tasks)):
        reason = pending_reason(job.job_id)
        if reason in HOPELESS:
            subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=30)
            kept = run_dir and os.path.exists(os.path.join(run_dir, "last.pt"))
            raise BsdistError(f"job {job.job_id} can never start: SLURM holds it pending ({reason}: "
                              f"{HOPELESS[reason]}), so it was cancelled; ask for less (--nodes, --gpus-per-node, "
                              "--ntasks-per-node, --cpus-per-task, --mem-gb, --timeout-min) or another --partition"
                              + (", with TRAIN.resume auto to continue from last.pt" if kept else ""))
        time.sleep(min(10.0, 1.0 + (time.monotonic() - started) / 10))
    try:
        return job.results()[0]
    except (FailedJobError, UncompletedJobError) as e:
        state = job.state
        if state.startswith("CANCELLED"):
            raise BsdistError(f"job {job.job_id} was cancelled ({state}); submit the same command with TRAIN.resume "
                              f"auto to continue from its last checkpoint; logs {_logs(job)}") from None
        if isinstance(e, FailedJobError):
            error = next((line for line in reversed(str(e).splitlines()) if "Error" in line), "see the log")
            raise BsdistError(f"job {job.job_id} failed: {error.strip()[:300]}; logs {_logs(job)}") from None
        raise BsdistError(f"job {job.job_id} ended without results (state {state}); logs {_logs(job)}") from None


def submit_sweep(args, runs: list) -> int:
    """Every unfinished run of a sweep as one job array, its folder under the sweep's savedir; with
    --wait, 0 only if every run succeeded."""
    from bsdist.metrics import describe_best
    from bsdist.sweep import savedir, unfinished
    pending = unfinished(runs)
    if not pending:
        LOG.info(f"all {len(runs)} runs finished before; nothing submitted")
        return 0
    folder = submission_folder(savedir(runs))
    params = executor_parameters(args, pending[0][1].cfg, "bsdist-sweep")
    params["array_parallelism"] = args.jobs or len(pending)
    jobs = _submitted(folder, params,
                      lambda executor: executor.submit_array([SlurmTask(run.cfg) for _, run in pending]))
    for (i, run), job in zip(pending, jobs):
        LOG.info(f"[{i}/{len(runs)}] {run.label}: job {job.job_id}, run directory {run.run_dir}, logs {_logs(job)}")
    if not args.wait:
        return 0
    failed = []
    for (i, run), job in zip(pending, jobs):
        try:
            LOG.info(f"[{i}/{len(runs)}] {run.label}: done, {describe_best(wait_for(job, run.run_dir)['best'])}")
        except BsdistError as e:
            failed.append(run.label)
            LOG.info(f"[{i}/{len(runs)}] {run.label}: FAILED: {e}")
    if failed:
        LOG.warning(f"{len(failed)} of {len(pending)} runs failed: {', '.join(failed)}; "
                    "submit the same sweep again to resume them")
        return 1
    return 0
