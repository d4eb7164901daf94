"""One table (Markdown and CSV) and one plot from every finished run under a directory.

    python -m bsdist.report RUNS_DIR        (or: python launch.py --report RUNS_DIR)

Rows are dataset x imbalance factor x loss with the best model's acc, bcr and many / medium / few
accuracy, its epoch and the split it was selected on, the last model's acc, and the run time; the
reference trainer's published accuracies stand beside ours where they exist. The plot draws acc
and bcr against the imbalance factor, cross-entropy and Balanced Softmax, one panel per dataset.
Writes report.md, report.csv and report.png into RUNS_DIR.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import yaml

from bsdist.errors import BsdistError

# The reference trainer's published test accuracies (exp imbalance; 50 epochs, batch 32, SGD lr 0.1,
# cosine, ResNet-18 with the CIFAR stem). Balanced Softmax was not run at factor 1.
REFERENCE_ACC = {
    ("CIFAR10LT", "CrossEntropyLoss"): {1: .9283, 10: .8717, 50: .7779, 100: .7065, 200: .6426},
    ("CIFAR10LT", "BalancedSoftmax"): {10: .8694, 50: .7992, 100: .7601, 200: .7034},
    ("CIFAR100LT", "CrossEntropyLoss"): {1: .7313, 10: .5865, 50: .4544, 100: .4060, 200: .3492},
    ("CIFAR100LT", "BalancedSoftmax"): {10: .5999, 50: .4845, 100: .4447, 200: .3823},
}
LOSS_ORDER = {"CrossEntropyLoss": 0, "BalancedSoftmax": 1}
COLUMNS = ("dataset", "imbalance_type", "imbalance_factor", "loss", "acc", "bcr", "many", "medium", "few", "best_epoch",
           "epochs", "selected_on", "last_acc", "reference_acc", "minutes", "run_dir")


def collect(runs_dir: str) -> tuple[list[dict], list[str]]:
    """(one row per finished run, sorted; run directories without results, i.e. unfinished)."""
    rows, unfinished = [], []
    for directory, _, files in sorted(os.walk(runs_dir)):
        if "config.yaml" not in files:
            continue
        if "results.json" not in files:
            unfinished.append(directory)
            continue
        with open(os.path.join(directory, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        with open(os.path.join(directory, "results.json")) as f:
            results = json.load(f)
        d, best = cfg["DATASET"], results["best"]
        factor = d["imbalance_factor"] if d["imbalance_type"] else 1.0
        factor = int(factor) if float(factor).is_integer() else factor
        reference = REFERENCE_ACC.get((d["name"], cfg["LOSS"]["name"]), {}) if d["imbalance_type"] in ("exp", None) else {}
        rows.append({
            "dataset": d["name"], "imbalance_type": d["imbalance_type"] or "balanced", "imbalance_factor": factor,
            "loss": cfg["LOSS"]["name"], "acc": best["acc"], "bcr": best["bcr"], "many": best["many"],
            "medium": best["medium"], "few": best["few"], "best_epoch": best["epoch"], "epochs": cfg["TRAIN"]["epochs"],
            "selected_on": best["selected_on"], "last_acc": results["last"]["acc"], "reference_acc": reference.get(factor),
            "minutes": results["seconds"] / 60, "run_dir": os.path.relpath(directory, runs_dir),
        })
    rows.sort(key=lambda r: (r["dataset"], r["imbalance_type"], r["imbalance_factor"], LOSS_ORDER.get(r["loss"], 9), r["loss"]))
    keys = [(r["dataset"], r["imbalance_type"], r["imbalance_factor"], r["loss"]) for r in rows]
    for key in keys:
        if keys.count(key) > 1:
            clash = [r["run_dir"] for r in rows if (r["dataset"], r["imbalance_type"], r["imbalance_factor"], r["loss"]) == key]
            raise BsdistError(f"runs {', '.join(clash)} under {runs_dir} share dataset, imbalance and loss; "
                              "report each sweep's directory on its own")
    return rows, unfinished


def _cell(value, digits=4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    head = ("dataset", "imbalance", "loss", "acc", "bcr", "many", "medium", "few", "best epoch", "selected on",
            "last acc", "reference acc", "minutes")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = (r["dataset"], f"{r['imbalance_type']} {r['imbalance_factor']}", r["loss"], _cell(r["acc"]), _cell(r["bcr"]),
                 _cell(r["many"]), _cell(r["medium"]), _cell(r["few"]), f"{r['best_epoch']}/{r['epochs']}", r["selected_on"],
                 _cell(r["last_acc"]), _cell(r["reference_acc"]), _cell(r["minutes"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise BsdistError("the plot needs matplotlib; install it with pip install 'bsdist[report]' "
                          "(report.md and report.csv were written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 7), squeeze=False)
    for col, dataset in enumerate(datasets):
        for row, metric in enumerate(("acc", "bcr")):
            ax = axes[row][col]
            for loss in sorted({r["loss"] for r in rows if r["dataset"] == dataset}, key=lambda x: LOSS_ORDER.get(x, 9)):
                series = [r for r in rows if r["dataset"] == dataset and r["loss"] == loss]
                line, = ax.plot([r["imbalance_factor"] for r in series], [r[metric] for r in series], "o-", label=loss)
                reference = [(r["imbalance_factor"], r["reference_acc"]) for r in series if r["reference_acc"] is not None]
                if metric == "acc" and reference:
                    ax.plot(*zip(*reference), "x--", color=line.get_color(), alpha=0.6, label=f"{loss} (reference)")
            ax.set_xscale("log")
            factors = sorted({r["imbalance_factor"] for r in rows if r["dataset"] == dataset})
            ax.set_xticks(factors, [str(f) for f in factors])
            ax.minorticks_off()
            ax.set_xlabel("imbalance factor")
            ax.set_ylabel(f"test {metric}")
            ax.set_title(f"{dataset}: {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(runs_dir: str) -> dict:
    """Write report.md, report.csv and report.png into runs_dir; return their paths."""
    if not os.path.isdir(runs_dir):
        raise BsdistError(f"{runs_dir} is not a directory; pass the DEFAULT.savedir of the runs to report")
    rows, unfinished = collect(runs_dir)
    if not rows:
        raise BsdistError(f"no finished run (results.json) under {runs_dir}" + (f"; {len(unfinished)} unfinished" if unfinished else ""))
    paths = {ext: os.path.join(runs_dir, f"report.{ext}") for ext in ("md", "csv", "png")}
    table = markdown(rows)
    with open(paths["md"], "w") as f:
        f.write(table)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(table, end="")
    if unfinished:
        print(f"{len(unfinished)} unfinished run(s) left out: {', '.join(os.path.relpath(u, runs_dir) for u in unfinished)}")
    plot(rows, paths["png"])
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['png']}")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m bsdist.report RUNS_DIR")
    try:
        write_report(sys.argv[1])
    except BsdistError as e:
        sys.exit(f"error: {e}")
