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
from bsdist.sweep import load_runs, load_sweep
from runs import launch, write_sweep
from paths import ROOT



@pytest.mark.slow
def test_a_two_by_two_sweep_runs_resumes_and_is_reported(cifar10_root, tmp_path):
    sweep = write_sweep(tmp_path, cifar10_root)
    first = launch("--sweep", sweep)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(": done in") == 4 and "all 4 runs finished" in first.stdout
    runs = tmp_path / "runs" / "CIFAR10LT" / "resnet18"
    names = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert names == ["BalancedSoftmax-exp-IF_1", "BalancedSoftmax-exp-IF_2", "CrossEntropyLoss-exp-IF_1",
                     "CrossEntropyLoss-exp-IF_2"]

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
    assert [(r["imbalance_factor"], r["method"], r["n"]) for r in rows] == [(1, "CE", 1), (1, "BS", 1), (2, "CE", 1),
                                                                            (2, "BS", 1)]
    assert rows[0]["reference_acc"] is None  # 1 epoch is not the reference recipe: its numbers stay out
    assert rows[3]["acc_mean"] == after["best"]["acc"]
    table = (tmp_path / "runs" / "report.md").read_text()
    assert table.count("\n| CIFAR10LT |") == 4 and "### Selected on the test split" in table
    with open(tmp_path / "runs" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "runs" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_module_entry_point_reports_too(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bsdist.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "no finished run" in proc.stderr


def test_exclusions_and_run_count(cifar10_root, tmp_path):
    sweep = write_sweep(tmp_path, cifar10_root,
                        exclude=[{"DATASET.imbalance_factor": 1, "LOSS.name": "BalancedSoftmax"}])
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
    ({"overrides": {"CRT.stage1": "runs/{DEFAULT.seed}"}},
     r"CRT.stage1 'runs/\{DEFAULT.seed\}' names \{DEFAULT.seed\}, which is not set"),
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
    assert names == [f"CrossEntropyLoss-exp-IF_100-aug_info_RandomCrop-lr_{lr}-seed_{s}"
                     for lr in (0.1, 0.2) for s in (0, 1)]
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
    assert [os.path.basename(r.run_dir) for r in runs] == ["CrossEntropyLoss-exp-IF_100-seed_3",
                                                           "CrossEntropyLoss-exp-IF_100-seed_5"]
    assert [r.cfg.DEFAULT.seed for r in runs] == [3, 5] and base.endswith("cifar10lt_ce.yaml")
    sweep = write_sweep(tmp_path, cifar10_root, axes={"DEFAULT.seed": [0, 1]})
    spec = yaml.safe_load(open(sweep))
    spec["overrides"]["DEFAULT.exp_name"] = "copy-of-{DEFAULT.seed}-at-{DATASET.batch_size}"
    open(sweep, "w").write(yaml.safe_dump(spec))
    assert [os.path.basename(r.run_dir) for r in load_sweep(sweep)[1]] == ["copy-of-0-at-50-seed_0",
                                                                           "copy-of-1-at-50-seed_1"]
    proc = launch("--report", str(tmp_path), "--seeds", "1", timeout=60)
    assert proc.returncode == 2 and "--seeds takes distinct seeds" in proc.stderr


def test_command_line_overrides_apply_to_every_run_of_a_sweep(cifar10_root, tmp_path):
    _, runs = load_sweep(write_sweep(tmp_path, cifar10_root), overrides=["TRAIN.epochs", "3", "OPTIMIZER.lr", "0.02"])
    assert len(runs) == 4 and all(r.cfg.TRAIN.epochs == 3 and r.cfg.OPTIMIZER.lr == 0.02 for r in runs)
    with pytest.raises(BsdistError, match="unknown config key TRAIN.epoch; did you mean TRAIN.epochs"):
        load_sweep(write_sweep(tmp_path, cifar10_root), overrides=["TRAIN.epoch", "3"])
    proc = launch("--report", "results", "extra", timeout=60)
    assert proc.returncode == 2 and "--report, which takes just RUNS_DIR" in proc.stderr
