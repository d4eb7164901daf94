"""The report (bsdist.report) on run directories written here: seeds aggregated as mean ± std, one table
per selection split, settings that differ named, published numbers only beside their own recipe."""

import csv
import json
import os
import statistics

import pytest

from bsdist import BsdistError, config
from bsdist.report import aggregate, collect, write_report
from paths import ROOT

NUM_PER_CLS = [120, 92, 71, 55, 43, 33, 25, 20, 15, 12]


def fake_run(savedir, name, acc, *overrides, base="configs/demo.yaml", selected_on="test", ece=0.05, epoch=3):
    """A finished run directory as train.main leaves it: config.yaml and results.json."""
    cfg = config.validate(config.load(os.path.join(ROOT, base), ["DEFAULT.savedir", str(savedir),
                                                                 "DEFAULT.exp_name", name, *overrides]),
                          device_here=False)
    directory = config.run_dir(cfg)
    os.makedirs(directory)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write(config.dump(cfg))
    recall = [acc] * 10
    best = {"acc": acc, "bcr": acc, "many": acc, "medium": acc, "few": None, "ece": ece, "nll": 1.0, "epoch": epoch,
            "selected_on": selected_on, "per_class_recall": recall}
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump({"best": best, "last": {"acc": acc - 0.01}, "num_per_cls": NUM_PER_CLS, "seconds": 60.0}, f)
    return directory


def test_the_seeds_of_a_cell_are_one_row_with_mean_std_and_n(tmp_path):
    accs = {0: 0.90, 1: 0.92, 2: 0.95}
    for seed, acc in accs.items():
        fake_run(tmp_path, f"bs-{seed}", acc, "DEFAULT.seed", str(seed), epoch=seed + 1)
    fake_run(tmp_path, "ce-0", 0.80, "LOSS.name", "CrossEntropyLoss")
    rows = aggregate(collect(str(tmp_path))[0])
    assert [(r["method"], r["n"]) for r in rows] == [("CE", 1), ("BS", 3)]
    bs = rows[1]
    assert bs["acc_mean"] == pytest.approx(statistics.mean(accs.values()))
    assert bs["acc_std"] == pytest.approx(statistics.stdev(accs.values()))
    assert bs["best_epoch_mean"] == 2 and bs["seeds"] == "0 1 2" and bs["few_mean"] is None
    assert rows[0]["acc_std"] is None  # one seed: no spread to report
    write_report(str(tmp_path))
    table = (tmp_path / "report.md").read_text()
    assert (f"| DigitsLT | exp 10 | BS | 3 | {statistics.mean(accs.values()):.4f} "
            f"± {statistics.stdev(accs.values()):.4f} |") in table
    assert "| DigitsLT | exp 10 | CE | 1 | 0.8000 | 0.8000 |" in table
    with open(tmp_path / "report.csv") as f:
        written = list(csv.DictReader(f))
    assert {"acc_mean", "acc_std", "bcr_mean", "bcr_std", "ece_mean", "n"} <= set(written[0])
    assert written[1]["n"] == "3" and float(written[1]["bcr_std"]) == pytest.approx(statistics.stdev(accs.values()))
    for name in ("report.png", "report_classes.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_selection_split_has_its_own_table(tmp_path):
    fake_run(tmp_path, "val", 0.9, "DATASET.val_per_cls", "10", selected_on="val")
    fake_run(tmp_path, "test", 0.7, selected_on="test")
    rows = aggregate(collect(str(tmp_path))[0])
    assert [r["selected_on"] for r in rows] == ["val", "test"]
    write_report(str(tmp_path))
    val_part, test_part = (tmp_path / "report.md").read_text().split("### Selected on the test split")
    assert "### Selected on the validation split" in val_part and "0.9000" in val_part and "0.7000" not in val_part
    assert "0.7000" in test_part and "0.9000" not in test_part


def test_settings_that_differ_between_cells_are_named_and_kept_apart(tmp_path):
    for lr in ("0.05", "0.1"):
        for seed in ("0", "1"):
            fake_run(tmp_path, f"lr{lr}-{seed}", 0.9, "OPTIMIZER.lr", lr, "DEFAULT.seed", seed)
    rows = aggregate(collect(str(tmp_path))[0])
    assert [(r["setting"], r["n"]) for r in rows] == [("OPTIMIZER.lr 0.05", 2), ("OPTIMIZER.lr 0.1", 2)]


def test_the_same_configuration_and_seed_twice_is_refused(tmp_path):
    fake_run(tmp_path, "a", 0.9)
    fake_run(tmp_path, "b", 0.8)
    with pytest.raises(BsdistError,
                       match=r"resnet18/a and .*resnet18/b are the same configuration with the same DEFAULT.seed 0"):
        aggregate(collect(str(tmp_path))[0])


def test_published_numbers_stand_only_beside_the_recipe_that_produced_them(tmp_path):
    base = "configs/cifar10lt_ce.yaml"
    fake_run(tmp_path, "reference", 0.7, base=base)
    fake_run(tmp_path, "momentum", 0.7, "OPTIMIZER.momentum", "0.9", base=base)
    rows = aggregate(collect(str(tmp_path))[0])
    assert [(r["setting"], r["reference_acc"]) for r in rows] == [("OPTIMIZER.momentum 0.0", .7065),
                                                                  ("OPTIMIZER.momentum 0.9", None)]
