"""Sweeps (python launch.py --sweep) and the report (python launch.py --report / python -m bsdist.report)."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from bsdist import BsdistError
from bsdist.report import aggregate, collect
from bsdist.sweep import GpuSlots, load_runs, load_sweep, visible_gpus
from runs import clean_env
from paths import ROOT



def write_sweep(tmp_path, root, **changes):
    spec = {
        "base": os.path.join(ROOT, "configs", "cifar10lt_ce.yaml"),
        "overrides": {"DEFAULT.savedir": str(tmp_path / "runs"), "DATASET.datadir": root, "DATASET.download": False,
                      "TRAIN.epochs": 1, "DATASET.batch_size": 50, "DATASET.test_batch_size": 103, "DATASET.num_workers": 0,
                      "TRAIN.device": "cpu", "TRAIN.compile": False},
        "axes": {"DATASET.imbalance_factor": [1, 2], "LOSS.name": ["CrossEntropyLoss", "BalancedSoftmax"]},
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def launch(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_two_by_two_sweep_runs_resumes_and_is_reported(cifar10_root, tmp_path):
    sweep = write_sweep(tmp_path, cifar10_root)
    first = launch("--sweep", sweep)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(": done in") == 4 and "all 4 runs finished" in first.stdout
    runs = tmp_path / "runs" / "CIFAR10LT" / "resnet18"
    names = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert names == ["BalancedSoftmax-exp-IF_1", "BalancedSoftmax-exp-IF_2", "CrossEntropyLoss-exp-IF_1", "CrossEntropyLoss-exp-IF_2"]

    # started again: finished runs are skipped; a run whose results were lost resumes from last.pt
    lost = runs / "BalancedSoftmax-exp-IF_2" / "results.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    again = launch("--sweep", sweep)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished before, skipped") == 3 and again.stdout.count(": done in") == 1
    after = json.loads(lost.read_text())
    assert after["best"]["confusion"] == before["best"]["confusion"] and after["last"]["epoch"] == 1
    assert "resumed from" in (runs / "BalancedSoftmax-exp-IF_2.log").read_text()

    report = launch("--report", str(tmp_path / "runs"))
    assert report.returncode == 0, report.stderr
    entries, unfinished = collect(str(tmp_path / "runs"))
    rows = aggregate(entries)
    assert not unfinished
    assert [(r["imbalance_factor"], r["method"], r["n"]) for r in rows] == [(1, "CE", 1), (1, "BS", 1), (2, "CE", 1), (2, "BS", 1)]
    assert rows[0]["reference_acc"] is None  # 1 epoch is not the reference recipe: its numbers stay out
    assert rows[3]["acc_mean"] == after["best"]["acc"]
    table = (tmp_path / "runs" / "report.md").read_text()
    assert table.count("\n| CIFAR10LT |") == 4 and "### Selected on the test split" in table
    with open(tmp_path / "runs" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "runs" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_module_entry_point_reports_too(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bsdist.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "no finished run" in proc.stderr


def test_exclusions_and_run_count(cifar10_root, tmp_path):
    sweep = write_sweep(tmp_path, cifar10_root, exclude=[{"DATASET.imbalance_factor": 1, "LOSS.name": "BalancedSoftmax"}])
    base, runs = load_sweep(sweep)
    assert base.endswith("cifar10lt_ce.yaml") and len(runs) == 3
    assert all(r.cfg.TRAIN.resume == "auto" for r in runs)
    assert [r.label for r in runs] == ["1/CrossEntropyLoss", "2/CrossEntropyLoss", "2/BalancedSoftmax"]


def test_the_shipped_sweeps_expand_to_their_grids():
    assert len(load_sweep(os.path.join(ROOT, "configs/sweeps/reference.yaml"))[1]) == 18
    assert len(load_sweep(os.path.join(ROOT, "configs/sweeps/recipe.yaml"))[1]) == 18
    assert len(load_sweep(os.path.join(ROOT, "configs/sweeps/demo.yaml"))[1]) == 7


@pytest.mark.parametrize("changes, message", [
    ({"axes": {"LOSS.nmae": ["BalancedSoftmax"]}}, "unknown config key LOSS.nmae; did you mean LOSS.name?"),
    ({"axes": {"DEFAULT.exp_name": ["same", "same"]}}, "share the run directory"),
    ({"overrides": {"CRT.stage1": "runs/{DEFAULT.seed}"}}, r"CRT.stage1 'runs/\{DEFAULT.seed\}' names \{DEFAULT.seed\}, which is not set"),
    ({"axes": {"LOSS.name": "BalancedSoftmax"}}, "axis LOSS.name must be a non-empty list"),
    ({"exclude": [{"OPTIMIZER.lr": 0.1}]}, "not an axis"),
    ({"exclude": [{"DATASET.imbalance_factor": 1}, {"DATASET.imbalance_factor": 2}]}, "leave no run"),
    ({"axes": {"DATASET.imbalance_factor": [0.5]}}, "run 0.5: DATASET.imbalance_factor must be >= 1"),
    ({"runs": 3}, "must be a mapping with base"),
])
def test_sweep_mistakes_are_named_before_any_run_starts(cifar10_root, tmp_path, changes, message):
    with pytest.raises(BsdistError, match=message.replace("?", r"\?")):
        load_sweep(write_sweep(tmp_path, cifar10_root, **changes))
    assert not (tmp_path / "runs").exists()


def test_every_axis_names_its_runs_so_that_none_collide(cifar10_root, tmp_path):
    sweep = write_sweep(tmp_path, cifar10_root, axes={"LOSS.name": ["CrossEntropyLoss"], "OPTIMIZER.lr": [0.1, 0.2],
                                                      "DATASET.aug_info": [["RandomCrop"]]})
    _, runs = load_sweep(sweep, seeds=[0, 1])
    names = [os.path.basename(r.run_dir) for r in runs]
    assert names == [f"CrossEntropyLoss-exp-IF_100-aug_info_RandomCrop-lr_{lr}-seed_{s}" for lr in (0.1, 0.2) for s in (0, 1)]
    assert [r.cfg.DEFAULT.seed for r in runs] == [0, 1, 0, 1] and len(runs) == 4
    # a fixed exp_name: every axis is named, the loss too
    _, runs = load_sweep(sweep, overrides=["DEFAULT.exp_name", "mine"])
    assert [os.path.basename(r.run_dir) for r in runs] == ["mine-aug_info_RandomCrop-name_CrossEntropyLoss-lr_0.1",
                                                           "mine-aug_info_RandomCrop-name_CrossEntropyLoss-lr_0.2"]
    with pytest.raises(BsdistError, match="already has a DEFAULT.seed axis; drop --seeds"):
        load_sweep(write_sweep(tmp_path, cifar10_root, axes={"DEFAULT.seed": [0, 1]}), seeds=[2])


def test_seeds_turn_one_config_into_a_sweep_and_braces_fill_in_each_run_s_values(cifar10_root, tmp_path):
    overrides = ["DEFAULT.savedir", str(tmp_path), "DATASET.datadir", cifar10_root, "TRAIN.device", "cpu"]
    base, runs = load_runs(None, os.path.join(ROOT, "configs", "cifar10lt_ce.yaml"), [3, 5], overrides=overrides)
    assert [os.path.basename(r.run_dir) for r in runs] == ["CrossEntropyLoss-exp-IF_100-seed_3", "CrossEntropyLoss-exp-IF_100-seed_5"]
    assert [r.cfg.DEFAULT.seed for r in runs] == [3, 5] and base.endswith("cifar10lt_ce.yaml")
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DEFAULT.seed": [0, 1]})
    spec = yaml.safe_load(open(sweep))
    spec["overrides"]["DEFAULT.exp_name"] = "copy-of-{DEFAULT.seed}-at-{DATASET.batch_size}"
    open(sweep, "w").write(yaml.safe_dump(spec))
    assert [os.path.basename(r.run_dir) for r in load_sweep(sweep)[1]] == ["copy-of-0-at-50-seed_0", "copy-of-1-at-50-seed_1"]
    proc = launch("--report", str(tmp_path), "--seeds", "1", timeout=60)
    assert proc.returncode == 2 and "--seeds takes distinct seeds" in proc.stderr


def test_command_line_overrides_apply_to_every_run_of_a_sweep(cifar10_root, tmp_path):
    _, runs = load_sweep(write_sweep(tmp_path, cifar10_root), overrides=["TRAIN.epochs", "3", "OPTIMIZER.lr", "0.02"])
    assert len(runs) == 4 and all(r.cfg.TRAIN.epochs == 3 and r.cfg.OPTIMIZER.lr == 0.02 for r in runs)
    with pytest.raises(BsdistError, match="unknown config key TRAIN.epoch; did you mean TRAIN.epochs"):
        load_sweep(write_sweep(tmp_path, cifar10_root), overrides=["TRAIN.epoch", "3"])
    proc = launch("--report", "results", "extra", timeout=60)
    assert proc.returncode == 2 and "--report, which takes just RUNS_DIR" in proc.stderr


def test_a_sweep_downloads_missing_data_once_before_any_run_and_stops_in_one_line_when_it_cannot(tmp_path, monkeypatch):
    import torchvision.datasets.utils
    from bsdist.sweep import run_sweep
    attempts = []

    def offline(url, root, **kwargs):
        attempts.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    sweep = write_sweep(tmp_path, str(tmp_path / "nodata"))
    spec = yaml.safe_load(open(sweep))
    spec["overrides"]["DATASET.download"] = True
    open(sweep, "w").write(yaml.safe_dump(spec))
    with pytest.raises(BsdistError, match=r"could not download https://\S+cifar-10-python.tar.gz into .*nodata .*by hand"):
        run_sweep(sweep)
    assert len(attempts) == 1  # once for the 4 runs, not once per run
    assert not (tmp_path / "runs").exists()  # no run started


def test_the_reason_a_run_failed_is_its_error_even_inside_torchrun_s_summary(tmp_path):
    from bsdist.sweep import _last_line
    log = tmp_path / "run.log"
    log.write_text("[10:00:00] epoch 1/3 step 2/7\nerror: imbalance factor 100 leaves class 6 with no training image\n"
                   "Root Cause (first observed failure):\n  traceback : error: imbalance factor 100 leaves class 6 with no "
                   "training image\n============================================================\n")
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
    assert "stopped by signal 15" in (tmp_path / "runs" / "CIFAR10LT" / "resnet18" / "CrossEntropyLoss-exp-IF_2.log").read_text()


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_error_and_the_rest_still_run(cifar10_root, tmp_path):
    # factor 100 leaves classes of the 20-image test set empty, found only when the run loads its data
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DATASET.imbalance_factor": [100, 2]})
    result = launch("--sweep", sweep)
    assert result.returncode == 1
    failed = next(line for line in result.stdout.splitlines() if line.startswith("[1/2] 100: FAILED (exit 2)"))
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
    import bsdist.sweep
    # names of GPUs this machine does not have: each run is told its own, finds no CUDA and trains on CPU
    monkeypatch.setattr(bsdist.sweep, "visible_gpus", lambda: ["GPU-a1", "GPU-b2"])
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DATASET.imbalance_factor": [1, 2]})
    spec = yaml.safe_load(open(sweep))
    spec["overrides"]["TRAIN.device"] = "auto"
    open(sweep, "w").write(yaml.safe_dump(spec))
    with pytest.raises(BsdistError, match="--nproc-per-node 5 needs that many GPUs for each run, and 2 are visible"):
        bsdist.sweep.run_sweep(sweep, jobs=2, nproc_per_node=5)
    assert bsdist.sweep.run_sweep(sweep, jobs=2) == 0
    out = capsys.readouterr().out
    assert "[1/2] 1: started on GPU GPU-a1" in out and "[2/2] 2: started on GPU GPU-b2" in out
    assert "all 2 runs finished" in out
