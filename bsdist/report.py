"""One table (Markdown and CSV) and two plots from every finished run under a directory.

    python -m bsdist.report RUNS_DIR        (or: python launch.py --report RUNS_DIR)

A row is a cell: dataset x imbalance x method (CE, BS, and where they were made CE + logit adjustment,
BS + tau-norm, BS + cRT, ...) x any other setting that differs between runs, over every seed run for
it, as mean ± std and n. Numbers are those of the selected model (best.pt) on the test split, and the
split it was selected on is part of the cell: each selection has a table of its own, so no column
mixes them. The reference trainer's published accuracies stand beside ours only where the run used
its recipe. report.png draws acc and bcr against the imbalance factor with the seeds' std as error
bars; report_classes.png per-class test recall against training images, one line per method.
Writes report.md, report.csv, report.png and report_classes.png into RUNS_DIR.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

from bsdist import config
from bsdist.config import Config
from bsdist.errors import BsdistError
from bsdist.plots import plot, plot_classes
from bsdist.rundir import results_of, saved_config

# The reference trainer's published test accuracies (exp imbalance; 50 epochs, batch 32, SGD lr 0.1,
# cosine, ResNet-18 with the CIFAR stem). Balanced Softmax was not run at factor 1.
REFERENCE_ACC = {
    ("CIFAR10LT", "CE"): {1: .9283, 10: .8717, 50: .7779, 100: .7065, 200: .6426},
    ("CIFAR10LT", "BS"): {10: .8694, 50: .7992, 100: .7601, 200: .7034},
    ("CIFAR100LT", "CE"): {1: .7313, 10: .5865, 50: .4544, 100: .4060, 200: .3492},
    ("CIFAR100LT", "BS"): {10: .5999, 50: .4845, 100: .4447, 200: .3823},
}
REFERENCE_RECIPE = {"TRAIN.epochs": 50, "DATASET.batch_size": 32, "OPTIMIZER.lr": 0.1, "OPTIMIZER.momentum": 0.0,
                    "OPTIMIZER.weight_decay": 0.0, "SCHEDULER.sched_name": "cosine_annealing", "MODEL.name": "resnet18",
                    "DATASET.split_seed": 0, "DATASET.val_per_cls": 0}
SHORT = {"CrossEntropyLoss": "CE", "BalancedSoftmax": "BS"}
METRICS = ("acc", "bcr", "many", "medium", "few", "ece", "nll", "best_epoch", "last_acc", "minutes", "tau")
# Keys that tell cells apart in their own columns, or that never change a result (seed: the spread a cell averages).
NOT_SETTINGS = {"DEFAULT.seed", "DEFAULT.exp_name", "DEFAULT.savedir", "DATASET.name", "DATASET.imbalance_type",
                "DATASET.imbalance_factor", "LOSS.name", "CRT.stage1",
                *(k for k, f in config.FIELDS.items() if f.resumable)}


def short(loss: str) -> str:
    return SHORT.get(loss, loss)


# evaluate.json's variants (bsdist.posthoc) as the report names them
POSTHOC = {"logit-adjust": "LA", "logit-adjust-tau1": "LA (tau 1)", "tau-norm": "tau-norm"}


def stage1_config(cfg: Config, results: dict) -> Config | dict | None:
    """The config of the stage-1 run a stage 2 came from ({} if that run has moved); None for a run of its own."""
    stage1 = results.get("stage1") or cfg.CRT.stage1
    if not stage1:
        return None
    try:
        return saved_config(stage1)
    except BsdistError:
        return {}


def method_of(cfg: Config, stage1: Config | dict | None) -> str:
    """CE, BS; a stage 2 (cRT) adds to its stage-1 run's method: BS + cRT (with CE, as cRT has it), BS + cRT (BS)."""
    name = short(cfg.LOSS.name)
    if stage1 is None:
        return name
    first = short(stage1.LOSS.name) if stage1 else "?"  # "?": the stage-1 run has moved
    return f"{first} + cRT" + ("" if name == "CE" else f" ({name})")


def setting_values(cfg: Config, stage1: Config | dict | None) -> dict:
    """What a run's cell may differ in: its settings, and for a stage 2 its stage-1 run's ("stage 1 KEY")."""
    values = {k: config.get(cfg, k) for k in config.FIELDS if k not in NOT_SETTINGS}
    if stage1:
        values.update({f"stage 1 {k}": config.get(stage1, k) for k in config.FIELDS if k not in NOT_SETTINGS})
    return values


def run_entries(directory: str, runs_dir: str) -> list[dict]:
    """One entry per method a finished run directory holds: the run's selected model, and each post-hoc
    variant of it that `--evaluate --posthoc` wrote (with the tau it tuned on the validation split)."""
    cfg, results = saved_config(directory), results_of(directory)
    dataset, best = cfg.DATASET, results["best"]
    factor = dataset.imbalance_factor if dataset.imbalance_type else 1.0
    stage1 = stage1_config(cfg, results)
    method = method_of(cfg, stage1)
    reference = None
    if dataset.imbalance_type in ("exp", None) and all(config.get(cfg, k) == v for k, v in REFERENCE_RECIPE.items()):
        reference = REFERENCE_ACC.get((dataset.name, method), {}).get(factor)
    entry = {
        "dataset": dataset.name,
        "imbalance_type": dataset.imbalance_type or ("as listed" if config.is_file_list(dataset.name) else "balanced"),
        "imbalance_factor": int(factor) if float(factor).is_integer() else factor, "method": method,
        "seed": cfg.DEFAULT.seed, "selected_on": best["selected_on"], "cfg": cfg, "reference_acc": reference,
        "settings": setting_values(cfg, stage1),
        "num_per_cls": results["num_per_cls"], "per_class_recall": best["per_class_recall"],
        "run_dir": os.path.relpath(directory, runs_dir),
        **{m: best.get(m) for m in ("acc", "bcr", "many", "medium", "few", "ece", "nll")},
        "best_epoch": best["epoch"], "last_acc": results["last"]["acc"], "minutes": results["seconds"] / 60,
        "tau": None,
    }
    entries = [entry]
    if os.path.exists(os.path.join(directory, "evaluate.json")):
        with open(os.path.join(directory, "evaluate.json")) as f:
            evaluated = json.load(f)
        for name, variant in evaluated["variants"].items():
            if name in POSTHOC:
                test = variant["test"]
                entries.append({**entry, "method": f"{method} + {POSTHOC[name]}", "reference_acc": None,
                                "per_class_recall": test["per_class_recall"], "last_acc": None, "tau": variant["tau"],
                                **{m: test.get(m) for m in ("acc", "bcr", "many", "medium", "few", "ece", "nll")}})
    return entries


def collect(runs_dir: str) -> tuple[list[dict], list[str]]:
    """(one entry per finished run and method, unfinished run directories)."""
    entries, unfinished = [], []
    for directory, _, files in sorted(os.walk(runs_dir)):
        if "config.yaml" not in files:
            continue
        if "results.json" not in files:
            unfinished.append(directory)
            continue
        entries += run_entries(directory, runs_dir)
    return entries, unfinished


def aggregate(entries: list[dict]) -> list[dict]:
    """One row per cell: every metric's mean, std (over seeds; None for a single run) and n.

    A cell is dataset x imbalance x method x selection split x the settings that differ between runs
    of that method there (a learning-rate sweep, say); the seed, and the stage-1 run a stage 2 names,
    are what a cell averages over."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["dataset"], e["imbalance_type"], e["imbalance_factor"], e["method"], e["selected_on"]),
                          []).append(e)
    cells: dict[tuple, tuple[list[str], list[dict]]] = {}
    for key, members in groups.items():
        names = list(dict.fromkeys(k for e in members for k in e["settings"]))
        settings = [k for k in names if len({repr(e["settings"].get(k)) for e in members}) > 1]
        for e in members:
            cell = cells.setdefault((*key, tuple(repr(e["settings"].get(k)) for k in settings)), (settings, []))
            cell[1].append(e)
    rows = []
    for settings, members in cells.values():
        seeds = [e["seed"] for e in members]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            clash = [e["run_dir"] for e in members if e["seed"] == twice[0]]
            raise BsdistError(f"{' and '.join(clash)} are the same configuration with the same DEFAULT.seed "
                              f"{twice[0]}; report each copy's directory on its own, or give one another seed")
        first = members[0]
        row = {k: first[k] for k in ("dataset", "imbalance_type", "imbalance_factor", "method", "selected_on",
                                     "reference_acc")}
        row["setting"] = ", ".join(f"{k} {first['settings'].get(k)}" for k in settings)
        row.update(n=len(members), seeds=" ".join(str(s) for s in sorted(seeds)), epochs=first["cfg"].TRAIN.epochs,
                   run_dirs=" ".join(e["run_dir"] for e in members), num_per_cls=first["num_per_cls"])
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([e[m] for e in members])
        row["per_class_recall"] = [mean_std([e["per_class_recall"][c] for e in members])[0]
                                   for c in range(len(first["per_class_recall"]))]
        rows.append(row)
    order = {"CE": 0, "BS": 1}
    rows.sort(key=lambda r: (r["selected_on"] != "val", r["dataset"], r["imbalance_type"], r["imbalance_factor"],
                             order.get(r["method"].split(" ")[0], 9), len(r["method"]), r["method"], r["setting"]))
    return rows


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values given (None entries left out; std None below 2)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    mean = sum(present) / len(present)
    if len(present) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))


def _cell(mean, std=None, digits=4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


SELECTION = {"val": "Selected on the validation split",
             "test": "Selected on the test split (as the published recipes do)"}


def markdown(rows: list[dict]) -> str:
    with_setting = any(r["setting"] for r in rows)
    head = ["dataset", "imbalance", "method", *(["setting"] if with_setting else []), "n", "acc", "bcr", "many",
            "medium", "few", "ECE", "best epoch", "last acc", "reference acc", "minutes"]
    parts = []
    for selection in ("val", "test"):
        chosen = [r for r in rows if r["selected_on"] == selection]
        if not chosen:
            continue
        lines = [f"### {SELECTION[selection]}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in chosen:
            imbalance = (r["imbalance_type"] if r["imbalance_type"] == "as listed"
                         else f"{r['imbalance_type']} {r['imbalance_factor']}")
            cells = [r["dataset"], imbalance, r["method"],
                     *([r["setting"] or "-"] if with_setting else []), str(r["n"]),
                     *[_cell(r[f"{m}_mean"], r[f"{m}_std"]) for m in ("acc", "bcr", "many", "medium", "few", "ece")],
                     f"{round(r['best_epoch_mean'], 1):g}/{r['epochs']}", _cell(r["last_acc_mean"], r["last_acc_std"]),
                     _cell(r["reference_acc"]), _cell(r["minutes_mean"], digits=1)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


CSV_COLUMNS = ("dataset", "imbalance_type", "imbalance_factor", "method", "setting", "selected_on", "n", "seeds",
               *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")], "reference_acc", "epochs", "run_dirs")


def write_report(runs_dir: str) -> dict:
    """Write report.md, report.csv, report.png and report_classes.png into runs_dir; return their paths."""
    if not os.path.isdir(runs_dir):
        raise BsdistError(f"{runs_dir} is not a directory; pass the DEFAULT.savedir of the runs to report")
    entries, unfinished = collect(runs_dir)
    if not entries:
        raise BsdistError(f"no finished run (results.json) under {runs_dir}"
                          + (f"; {len(unfinished)} unfinished" if unfinished else ""))
    rows = aggregate(entries)
    paths = {name: os.path.join(runs_dir, name)
             for name in ("report.md", "report.csv", "report.png", "report_classes.png")}
    table = markdown(rows)
    with open(paths["report.md"], "w") as f:
        f.write(table)
    with open(paths["report.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(table, end="")
    if unfinished:
        print(f"{len(unfinished)} unfinished run(s) left out: "
              f"{', '.join(os.path.relpath(u, runs_dir) for u in unfinished)}")
    plot(rows, paths["report.png"])
    plot_classes(rows, paths["report_classes.png"])
    print(f"wrote {', '.join(paths.values())}")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m bsdist.report RUNS_DIR")
    try:
        write_report(sys.argv[1])
    except BsdistError as e:
        sys.exit(f"error: {e}")
