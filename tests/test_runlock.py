"""One run per run directory (bsdist.runlock): real processes hold the lock, die, restart and are requeued."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bsdist import config
from bsdist.output import console
from bsdist.runlock import LOCK_FILE, RunDirBusy, RunLock, hold_run_dir, holder_of
from paths import ROOT
from runs import clean_env, launch, snapshot, write_sweep

console()  # the lock's lines go to the console, where capsys sees them

# A process that holds a run directory (the same call main() makes), says so, and sleeps; with "fork" it
# first forks a child that outlives it, as a DataLoader worker would, and prints the child's pid.
HOLDER = """
import os, sys, time
from bsdist.output import console
console()
from bsdist.runlock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    child = os.fork() if sys.argv[2] == "fork" else 1
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print("held", child, flush=True)
    time.sleep(float(sys.argv[3]))
"""


def start_holder(run_dir, seconds=300.0, fork=False, **env):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), "fork" if fork else "-", str(seconds)],
                            cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["held"], "the holder did not start"
    return proc, int(line[1])


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.slow
def test_a_second_launch_is_refused_at_once_naming_the_holder_and_changes_nothing(tmp_path):
    cfg = config.validate(config.load("configs/demo.yaml", ["DEFAULT.savedir", str(tmp_path), "TRAIN.device", "cpu"]))
    run_dir = config.run_dir(cfg)
    holder, _ = start_holder(run_dir)
    try:
        with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
            f.write("epoch,step\n1,11\n")  # what the first run has written so far
        before = snapshot(run_dir)
        started = time.monotonic()
        second = launch("configs/demo.yaml", "DEFAULT.savedir", str(tmp_path), "TRAIN.device", "cpu", timeout=120)
        assert second.returncode == 75, second.stderr
        assert second.stderr.splitlines() == [
            f"error: run directory {run_dir} is held by another run: pid {holder.pid} on {os.uname().nodename} "
            f"since {json.load(open(os.path.join(run_dir, LOCK_FILE)))['started']} (-c {run_dir} - 300.0); wait for "
            f"it to end, choose another DEFAULT.exp_name, or stop it (kill {holder.pid} on {os.uname().nodename}) and "
            "start again"]
        assert snapshot(run_dir) == before and holder.poll() is None
        print(f"refused after {time.monotonic() - started:.1f} s, interpreter start-up included")
    finally:
        stop(holder)


def test_the_lock_is_released_at_the_end_however_the_run_ends(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with hold_run_dir(str(tmp_path)):
            assert holder_of(str(tmp_path))["pid"] == os.getpid()
            1 / 0
    assert holder_of(str(tmp_path)) is None and open(tmp_path / LOCK_FILE).read() == ""
    lock = RunLock(str(tmp_path))
    lock.acquire()  # an orderly end left nothing to take over
    lock.release()
    with hold_run_dir(str(tmp_path / "runs" / "a" / "b")):  # a run stopped before writing leaves nothing behind
        pass
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]
    with hold_run_dir(str(tmp_path / "runs" / "a")) as lock:
        open(tmp_path / "runs" / "a" / "config.yaml", "w").close()
    assert sorted(os.listdir(tmp_path / "runs" / "a")) == ["config.yaml", LOCK_FILE]


def test_a_holder_killed_with_sigkill_is_taken_over_at_once_though_its_forked_child_lives(tmp_path, capsys):
    holder, child = start_holder(tmp_path, fork=True)
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the child still runs, with the lock file open
        started = time.monotonic()
        with hold_run_dir(str(tmp_path)):
            assert time.monotonic() - started < 1.0  # the child had closed its copy: nothing to wait for
            assert holder_of(str(tmp_path))["pid"] == os.getpid()
        said = capsys.readouterr().out
        assert f"took over {tmp_path / LOCK_FILE} from pid {holder.pid} on" in said
        assert said.rstrip().endswith(": it ended without releasing it")
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_slurm_requeue_waits_for_its_earlier_attempt_and_a_stranger_is_refused(tmp_path, monkeypatch, capsys):
    first, _ = start_holder(tmp_path, seconds=3, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # another job: refused at once, told how to stop the holder
        with pytest.raises(RunDirBusy, match=rf"held by another run: pid {first.pid} on .*SLURM job 4242 restart 0 "
                                             r".*or stop it \(scancel 4242\) and start again"):
            RunLock(str(tmp_path)).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with pytest.raises(RunDirBusy, match=r"an earlier attempt of this run, there after 1 s"):
            RunLock(str(tmp_path)).acquire(wait_s=1)  # bounded
        requeued = RunLock(str(tmp_path))
        requeued.acquire(wait_s=60)
        assert first.wait(timeout=30) == 0  # it waited for the earlier attempt to let go, then ran on
        requeued.release()
        said = capsys.readouterr().out
        assert f"waiting up to 60 s for pid {first.pid}" in said and "an earlier attempt of this run, to rel" in said
    finally:
        stop(first)


def test_a_restart_of_another_launch_is_a_stranger(tmp_path, monkeypatch):
    first, _ = start_holder(tmp_path, TORCHELASTIC_RUN_ID="run-a", TORCHELASTIC_RESTART_COUNT="0")
    try:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
        started = time.monotonic()
        with pytest.raises(RunDirBusy, match="torchrun run run-a restart 0"):
            RunLock(str(tmp_path)).acquire(wait_s=60)
        assert time.monotonic() - started < 5
    finally:
        stop(first)


TORCHRUN_SCRIPT = """
import os, sys
from bsdist.output import console
console()
from bsdist.runlock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), 9)  # the first attempt dies holding the lock
    print("attempt", os.environ["TORCHELASTIC_RESTART_COUNT"], "holds it", flush=True)
"""


@pytest.mark.slow
def test_a_torchrun_restart_takes_over_its_own_earlier_attempt_s_lock(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "--max-restarts", "1", str(script), str(tmp_path / "run")],
                          cwd=ROOT, env=clean_env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "attempt 1 holds it" in proc.stdout
    assert "restart 0 (hold.py " in proc.stdout and ": an earlier attempt of this run" in proc.stdout


def test_without_advisory_locks_the_lock_file_alone_keeps_a_live_run_out(tmp_path, monkeypatch, capsys):
    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", unsupported)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "advisory locks do not work on the file system of" in capsys.readouterr().err
    with pytest.raises(RunDirBusy, match=r"advisory locks do not work here, so .*run.lock alone says so: delete it"):
        RunLock(str(tmp_path)).acquire()  # a live holder on this host (this very process)
    payload = json.load(open(tmp_path / LOCK_FILE))
    lock.release()
    with open(tmp_path / LOCK_FILE, "w") as f:
        json.dump({**payload, "pid": dead_pid()}, f)  # as a SIGKILL leaves it
    after_kill = RunLock(str(tmp_path))
    after_kill.acquire()
    after_kill.release()
    assert "it ended without releasing it" in capsys.readouterr().out


def test_a_sweep_leaves_the_runs_another_process_holds_and_lists_them(cifar10_root, tmp_path, capsys):
    from bsdist.sweep import load_sweep, unfinished
    _, runs = load_sweep(write_sweep(tmp_path, cifar10_root))
    holder, _ = start_holder(runs[1].run_dir)
    try:
        assert [i for i, _ in unfinished(runs)] == [1, 3, 4]
        said = capsys.readouterr().out
        assert f"[2/4] {runs[1].label}: held by pid {holder.pid} on " in said and "left to it" in said
    finally:
        stop(holder)


@pytest.mark.slow
def test_a_sweep_started_twice_runs_each_run_once(cifar10_root, tmp_path):
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DATASET.imbalance_factor": [1, 2, 3]})
    command = [sys.executable, os.path.join(ROOT, "launch.py"), "--sweep", sweep]
    first = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    run1 = tmp_path / "runs" / "CIFAR10LT" / "resnet18" / "CrossEntropyLoss-exp-IF_1"
    deadline = time.monotonic() + 120
    while holder_of(str(run1)) is None:  # the second starts once the first is running its first run
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.2)
    second = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    out_first, _ = first.communicate(timeout=600)
    out_second = second.stdout + second.stderr
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert "1: held by pid" in out_second
    for label in ("1", "2", "3"):
        assert (out_first + out_second).count(f"] {label}: done in") == 1, (label, out_first, out_second)
    for run in (tmp_path / "runs" / "CIFAR10LT" / "resnet18").iterdir():
        if run.is_dir():
            assert (run / "results.json").exists()
            assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()] == ["epoch", "1"]
            assert len([f for f in os.listdir(run) if "tfevents" in f]) == 1
