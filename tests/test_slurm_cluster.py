"""launch.py --slurm on a real SLURM cluster on this machine (slurm/dev-cluster.sh up; .ci/run starts
it): a 2-task gloo job, a job preempted mid-run, a cancelled job, a bad partition and a sweep array."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from bsdist import config
from runs import clean_env, launch
from paths import ROOT



def _cluster_problem():
    if shutil.which("sbatch") is None:
        return "the Slurm packages are not installed (slurm/dev-cluster.sh up installs them and starts a local cluster)"
    try:
        state = subprocess.run(["sinfo", "-h", "-p", "gpu", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer: is the cluster up? (slurm/dev-cluster.sh up)"
    if state.returncode != 0 or not state.stdout.strip():
        reason = (state.stderr.strip().splitlines() or ['no partition gpu'])[-1]
        return ("no SLURM cluster with a gpu partition answers: start one with slurm/dev-cluster.sh up and "
                f"eval \"$(slurm/dev-cluster.sh env)\" ({reason})")
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem()))]

JOB = ["--slurm", "--partition", "gpu", "--ntasks-per-node", "2", "TRAIN.device", "cpu", "TRAIN.epochs", "3",
       "TRAIN.ckpt_every_steps", "2", "SCHEDULER.params.warmup_epochs", "0", "OPTIMIZER.momentum", "0.9"]


def run_dir(savedir, *overrides):
    return config.run_dir(config.validate(config.load("configs/demo.yaml",
                                                      ["DEFAULT.savedir", str(savedir), *overrides]),
                                          device_here=False))


def job_id(stdout):
    return re.search(r"submitted job (\d+)", stdout).group(1)


def wait_until(condition, what, seconds=300):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        time.sleep(0.5)


def sacct_state(job):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[0] if out.strip() else ""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2-task job run to the end with --wait: (its launcher output, its run directory)."""
    savedir = tmp_path_factory.mktemp("uninterrupted")
    result = launch("configs/demo.yaml", *JOB, "--wait", "DEFAULT.savedir", str(savedir))
    assert result.returncode == 0, result.stdout + result.stderr
    return result, run_dir(savedir)


def test_a_two_task_job_trains_and_writes_results_and_tensorboard(uninterrupted):
    result, directory = uninterrupted
    job = job_id(result.stdout)
    assert f"job {job} done: best (epoch" in result.stdout
    results = json.load(open(os.path.join(directory, "results.json")))
    assert results["last"]["epoch"] == 3 and results["last"]["num_images"] == 500
    assert any(f.startswith("events.out.tfevents.") for f in os.listdir(directory))
    assert "2 process(es) on cpu" in open(os.path.join(directory, "log.txt")).read()
    folders = os.listdir(os.path.join(directory, "slurm"))
    assert len(folders) == 1 and os.path.exists(os.path.join(directory, "slurm", folders[0], f"{job}_0_log.out"))
    wait_until(lambda: sacct_state(job) == "COMPLETED", "accounting to see the job complete", seconds=60)


def test_a_job_preempted_mid_run_requeues_resumes_and_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    result = launch("configs/demo.yaml", *JOB, "DEFAULT.savedir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    job, directory = job_id(result.stdout), run_dir(tmp_path)
    wait_until(lambda: os.path.exists(os.path.join(directory, "last.pt")), "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before a time limit or preemption
    wait_until(lambda: os.path.exists(os.path.join(directory, "results.json")), "the requeued job's results")
    wait_until(lambda: sacct_state(job) == "COMPLETED", "the job to complete", seconds=60)
    log = open(os.path.join(directory, "log.txt")).read()
    assert "resumed from" in log and "stopped by signal 12" in log
    ours = json.load(open(os.path.join(directory, "results.json")))
    reference = json.load(open(os.path.join(uninterrupted[1], "results.json")))
    for key in ("best", "last"):
        assert ours[key]["confusion"] == reference[key]["confusion"] and ours[key]["epoch"] == reference[key]["epoch"]


def test_a_cancelled_job_is_reported_by_wait(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "configs/demo.yaml", *JOB, "--wait",
                             "TRAIN.epochs", "50", "DEFAULT.savedir", str(tmp_path)],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = job_id(proc.stdout.readline())
        wait_until(lambda: sacct_state(job) == "RUNNING", "the job to start")
        subprocess.run(["scancel", job], check=True)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert err.startswith(f"error: job {job} was cancelled (CANCELLED") and "TRAIN.resume auto" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_partition_is_one_clear_error_and_leaves_nothing(tmp_path):
    result = launch("configs/demo.yaml", *JOB, "--partition", "nosuch", "DEFAULT.savedir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: sbatch refused the job: Batch job submission failed: Invalid partition "
                                     "name specified (--partition nosuch); sinfo lists the partitions")
    assert os.listdir(tmp_path) == []


def test_a_sweep_is_one_job_array_and_a_second_submission_skips_finished_runs(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "base": os.path.join(ROOT, "configs", "demo.yaml"),
        "overrides": {"DEFAULT.savedir": str(tmp_path / "runs"), "TRAIN.device": "cpu", "TRAIN.epochs": 1,
                      "SCHEDULER.params.warmup_epochs": 0},
        "axes": {"LOSS.name": ["CrossEntropyLoss", "BalancedSoftmax"]}}))
    result = launch("--sweep", str(sweep), "--slurm", "--partition", "gpu", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = re.findall(r": job (\d+_\d+),", result.stdout)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1  # one array
    assert result.stdout.count(": done, best (epoch 1) test acc") == 2
    again = launch("--sweep", str(sweep), "--slurm", "--partition", "gpu")
    assert again.returncode == 0 and "all 2 runs finished before; nothing submitted" in again.stdout


def sbatch_template(savedir, *extra):
    """Submit slurm/torchrun.sbatch with two CPU workers; return the job id."""
    os.makedirs(savedir, exist_ok=True)  # SLURM fails a job whose --output directory is missing
    submitted = subprocess.run(["sbatch", "--parsable", "--partition", "gpu", "--cpus-per-task", "2", *extra,
                                f"--output={savedir}/slurm-%j.out", "slurm/torchrun.sbatch", "configs/demo.yaml",
                                *JOB[JOB.index("TRAIN.device"):], "DEFAULT.savedir", str(savedir)],
                               cwd=ROOT, env=clean_env(NPROC_PER_NODE="2"), capture_output=True, text=True, check=True)
    return submitted.stdout.strip().split(";")[0]


def test_the_sbatch_torchrun_template_trains_and_requeues_near_the_time_limit(tmp_path):
    sbatch_template(tmp_path / "straight", "--wait")  # torchrun's workers run one thread each: compare like with like
    job, directory = sbatch_template(tmp_path / "requeued"), run_dir(tmp_path / "requeued")
    wait_until(lambda: os.path.exists(os.path.join(directory, "last.pt")), "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@120 sends
    wait_until(lambda: os.path.exists(os.path.join(directory, "results.json")), "the requeued job's results")
    wait_until(lambda: sacct_state(job) == "COMPLETED", "the job to complete", seconds=60)
    assert "requeueing job" in open(tmp_path / "requeued" / f"slurm-{job}.out").read()
    assert "resumed from" in open(os.path.join(directory, "log.txt")).read()
    ours = json.load(open(os.path.join(directory, "results.json")))
    reference = json.load(open(os.path.join(run_dir(tmp_path / "straight"), "results.json")))
    assert ours["last"]["confusion"] == reference["last"]["confusion"]
