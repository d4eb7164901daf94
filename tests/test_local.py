"""A sweep's runs on this machine (bsdist.local): data prepared once before any run, runs at once spread
over the GPUs, a failed run named by its own error, Ctrl-C stopping every run at a checkpoint."""

import os
import subprocess
import sys

import pytest
import yaml

import bsdist.local
from bsdist import BsdistError
from bsdist.local import GpuSlots, _last_line, run_sweep, visible_gpus
from paths import ROOT
from runs import clean_env, launch, write_sweep


def test_a_sweep_downloads_missing_data_once_before_any_run_and_stops_in_one_line_when_it_cannot(tmp_path, monkeypatch):
    import torchvision.datasets.utils
    attempts = []

    def offline(url, root, **kwargs):
        attempts.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    sweep = write_sweep(tmp_path, str(tmp_path / "nodata"))
    spec = yaml.safe_load(open(sweep))
    spec["overrides"]["DATASET.download"] = True
    open(sweep, "w").write(yaml.safe_dump(spec))
    with pytest.raises(BsdistError,
                       match=r"could not download https://\S+cifar-10-python.tar.gz into .*nodata .*by hand"):
        run_sweep(sweep)
    assert len(attempts) == 1  # once for the 4 runs, not once per run
    assert not (tmp_path / "runs").exists()  # no run started


def test_the_reason_a_run_failed_is_its_error_even_inside_torchrun_s_summary(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("[10:00:00] epoch 1/3 step 2/7\nerror: imbalance factor 100 leaves class 6 with no training image\n"
                   "Root Cause (first observed failure):\n"
                   "  traceback : error: imbalance factor 100 leaves class 6 with no training image\n"
                   "============================================================\n")
    assert _last_line(str(log)) == "error: imbalance factor 100 leaves class 6 with no training image"
    log.write_text("[10:00:00] epoch 1/3 step 2/7\nKilled\n====================\n")
    assert _last_line(str(log)) == "Killed"


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_s_runs_at_a_checkpoint_in_one_line(cifar10_root, tmp_path):
    import signal
    import time
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DATASET.imbalance_factor": [2]})
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), "--sweep", sweep, "TRAIN.epochs", "30",
                             "TRAIN.ckpt_every_steps", "1"], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "CIFAR10LT" / "resnet18" / "CrossEntropyLoss-exp-IF_2"
    deadline = time.time() + 240
    while not (run / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "sweep stopped; 2 kept their last checkpoint" in err
    assert (run / "last.pt").exists() and not (run / "results.json").exists()
    run_log = tmp_path / "runs" / "CIFAR10LT" / "resnet18" / "CrossEntropyLoss-exp-IF_2.log"
    assert "stopped by signal 15" in run_log.read_text()


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_error_and_the_rest_still_run(cifar10_root, tmp_path):
    # factor 100 leaves classes of the 20-image test set empty, found only when the run loads its data
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DATASET.imbalance_factor": [100, 2]})
    result = launch("--sweep", sweep)
    assert result.returncode == 1
    failed = next(line for line in result.stdout.splitlines() if "] [1/2] 100: FAILED (exit 2)" in line)
    assert "min: 'error: imbalance factor 100 leaves class 6 with no training image" in failed
    assert "[2/2] 2: done in" in result.stdout
    assert "1 of 2 runs failed: 100; run the same command again" in result.stderr


def test_gpu_slots_give_each_run_its_own_gpus_then_share_the_least_loaded():
    slots = GpuSlots(["0", "1", "2"], 1)
    assert [slots.take(), slots.take(), slots.take(), slots.take()] == ["0", "1", "2", "0"]  # a fourth run shares a GPU
    assert slots.available()
    slots = GpuSlots(["0", "1", "2", "3"], 2)
    assert slots.groups == ["0,1", "2,3"]
    assert [slots.take(), slots.take()] == ["0,1", "2,3"]
    assert not slots.available()  # two-process runs never share GPUs: a third waits
    slots.give_back("2,3")
    assert slots.available() and slots.take() == "2,3"
    assert GpuSlots(["0", "1", "2"], 2).groups == ["0,1"]  # a group is whole or not at all
    assert GpuSlots([], 1).take() is None  # no GPU: runs keep the environment they were given


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1, GPU-b2,GPU-c3")  # CUDA counts what it can use
    assert visible_gpus() == ["GPU-a1", "GPU-b2"]


@pytest.mark.slow
def test_runs_at_once_are_spread_over_the_gpus(cifar10_root, tmp_path, monkeypatch, capsys):
    # names of GPUs this machine does not have: each run is told its own, finds no CUDA and trains on CPU
    monkeypatch.setattr(bsdist.local, "visible_gpus", lambda: ["GPU-a1", "GPU-b2"])
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DATASET.imbalance_factor": [1, 2]})
    spec = yaml.safe_load(open(sweep))
    spec["overrides"]["TRAIN.device"] = "auto"
    open(sweep, "w").write(yaml.safe_dump(spec))
    with pytest.raises(BsdistError, match="--nproc-per-node 5 needs that many GPUs for each run, and 2 are visible"):
        bsdist.local.run_sweep(sweep, jobs=2, nproc_per_node=5)
    assert bsdist.local.run_sweep(sweep, jobs=2) == 0
    out = capsys.readouterr().out
    assert "[1/2] 1: started on GPU GPU-a1" in out and "[2/2] 2: started on GPU GPU-b2" in out
    assert "all 2 runs finished" in out
