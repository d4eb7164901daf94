"""Pictures, drawn with matplotlib. For TensorBoard: an evaluation's confusion matrix with class names, a
colour bar and values up to 20 classes; beyond that, per-class recall against the classes' training counts,
since a heat map of hundreds of classes shows nothing; and the reliability diagram of a split's confidences.
For the report: test accuracy and bcr against the imbalance factor per dataset (report.png), and per-class
recall against the class's training images (report_classes.png), from the cells of
`bsdist.report.aggregate` (mean and std over seeds).

The confusion matrix's colour scale is logarithmic from 0.1% to 100% of a row, so the 1-2% confusions that
tell the tail classes apart are visible; an empty cell stays white.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from bsdist.atomic import write_atomic
from bsdist.metrics import FEW_SHOT, MANY_SHOT, expected_calibration_error

LOG_FLOOR = 1e-3  # the share of a row at which the colour scale starts
MAX_HEATMAP_CLASSES = 20
VIRIDIS = colormaps["viridis"].with_extremes(bad="white")  # bad: the masked empty cells


def class_figure(metrics: dict, num_per_cls: list[int], class_names: list[str], title: str) -> Figure:
    """An evaluation's confusion matrix (up to 20 classes) or per-class recall by training count."""
    if len(num_per_cls) <= MAX_HEATMAP_CLASSES:
        return confusion_figure(metrics["confusion"], class_names, title)
    return recall_by_count_figure(metrics["per_class_recall"], num_per_cls, title)


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str) -> Figure:
    """Rows: true classes, normalised to recall; columns: predicted classes; each cell's share in percent."""
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(counts)
    fig = Figure(figsize=(max(5.5, 2.5 + 0.45 * n), max(4.5, 2 + 0.45 * n)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_equal(shares, 0), cmap=VIRIDIS, norm=LogNorm(LOG_FLOOR, 1, clip=True))
    for (r, c), share in np.ndenumerate(shares):
        if counts[r, c]:  # in black or white, whichever the cell's colour shows better
            bright = np.dot(image.to_rgba(share)[:3], (0.299, 0.587, 0.114)) > 0.55
            ax.text(c, r, f"{100 * share:.0f}" if share >= 0.01 else "<1", ha="center", va="center", fontsize=8,
                    color="black" if bright else "white")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\nrows: recall of the true class; colour: log share", fontsize=10)
    bar = fig.colorbar(image, ax=ax, ticks=[LOG_FLOOR, 0.01, 0.1, 1])
    bar.ax.set_yticklabels(["0.1%", "1%", "10%", "100%"])
    fig.tight_layout()
    return fig


def recall_by_count_figure(per_class_recall: list[float | None], num_per_cls: list[int], title: str) -> Figure:
    """Per-class recall (None: a class absent from the split), classes sorted by training count (largest
    first), with the count drawn on a log scale beside it and the many / medium / few boundaries marked."""
    order = np.argsort(-np.asarray(num_per_cls), kind="stable")
    counts = np.asarray(num_per_cls)[order]
    recall = [per_class_recall[c] for c in order]
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot()
    present = [i for i, r in enumerate(recall) if r is not None]
    ax.bar(present, [recall[i] for i in present], width=1.0, color=VIRIDIS([recall[i] for i in present]))
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel("classes, most training images first")
    ax.set_ylabel("recall")
    for threshold, name in ((MANY_SHOT, "many | medium"), (FEW_SHOT - 1, "medium | few")):
        i = int(np.searchsorted(-counts, -threshold, side="right"))  # classes with more than threshold images
        if 0 < i < len(order):
            ax.axvline(i - 0.5, color="tab:red", linewidth=1)
            ax.text(i - 0.5, 0.98, f" {name}", color="tab:red", ha="left", va="top", fontsize=8)
    training = ax.twinx()
    training.plot(range(len(order)), counts, color="grey", linewidth=2)
    training.set_yscale("log")
    training.set_ylabel("training images", color="grey")
    ax.set_title(f"{title}\nper-class recall (bars) of {len(order)} classes, sorted by training images (grey, log "
                 "scale)", fontsize=10)
    fig.tight_layout()
    return fig


def reliability_figure(bins: list[list[float]], title: str) -> Figure:
    """Accuracy against confidence per equal-width bin (metrics.calibration_bins), with the diagonal of
    perfect calibration, each bin's gap to it shaded, and its share of the images drawn below."""
    table = np.asarray(bins, dtype=np.float64)
    count, confidence, correct = table[:, 0], table[:, 1], table[:, 2]
    filled = count > 0
    edges = np.linspace(0, 1, len(table) + 1)
    left, width = edges[:-1][filled], 1 / len(table)
    accuracy, mean_confidence = correct[filled] / count[filled], confidence[filled] / count[filled]
    fig = Figure(figsize=(5.5, 6.5))
    ax, share = fig.subplots(2, 1, sharex=True, height_ratios=[4, 1])
    ax.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="white", label="accuracy")
    ax.bar(left, mean_confidence - accuracy, bottom=accuracy, width=width, align="edge", color="tab:red",
           alpha=0.5, label="gap to the mean confidence")
    ax.plot([0, 1], [0, 1], color="black", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    total = max(count.sum(), 1.0)
    ax.set_title(f"{title}\nECE {expected_calibration_error(table):.4f} over {int(total)} images", fontsize=10)
    share.bar(left, count[filled] / total, width=width, align="edge", color="grey")
    share.set_ylabel("images")
    share.set_xlabel("confidence (top softmax probability)")
    fig.tight_layout()
    return fig


def _label(r: dict, rows: list[dict]) -> str:
    label = r["method"] + (f" ({r['setting']})" if r["setting"] else "")
    return label + (f", selected on {r['selected_on']}" if len({x["selected_on"] for x in rows}) > 1 else "")


def save(fig: Figure, path: str) -> None:
    """Lay the figure out and write it at 100 dpi, atomically (the format follows the name)."""
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:]))


def plot(rows: list[dict], path: str) -> None:
    datasets = sorted({r["dataset"] for r in rows})
    fig = Figure(figsize=(5.5 * len(datasets), 7.5))
    axes = fig.subplots(2, len(datasets), squeeze=False)
    for col, dataset in enumerate(datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        for row, metric in enumerate(("acc", "bcr")):
            ax = axes[row][col]
            for label in dict.fromkeys(_label(r, rows) for r in mine):
                series = sorted((r for r in mine if _label(r, rows) == label), key=lambda r: r["imbalance_factor"])
                line = ax.errorbar([r["imbalance_factor"] for r in series], [r[f"{metric}_mean"] for r in series],
                                   yerr=[r[f"{metric}_std"] or 0.0 for r in series], fmt="o-", capsize=3, label=label)
                reference = [(r["imbalance_factor"], r["reference_acc"]) for r in series
                             if r["reference_acc"] is not None]
                if metric == "acc" and reference:
                    ax.plot(*zip(*reference), "x--", color=line[0].get_color(), alpha=0.6, label=f"{label} (reference)")
            ax.set_xscale("log")
            factors = sorted({r["imbalance_factor"] for r in mine})
            ax.set_xticks(factors, [str(f) for f in factors])
            ax.minorticks_off()
            ax.set_xlabel("imbalance factor")
            ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
            ax.set_title(f"{dataset}: {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save(fig, path)


def plot_classes(rows: list[dict], path: str) -> None:
    """Per-class test recall (mean over seeds) against the class's training images, log x, one line per method."""
    panels = list(dict.fromkeys((r["dataset"], r["imbalance_type"], r["imbalance_factor"]) for r in rows))
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(5 * cols, 4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for r in (r for r in rows if (r["dataset"], r["imbalance_type"], r["imbalance_factor"]) == panel):
            counts = r["num_per_cls"]
            order = sorted(range(len(counts)), key=lambda c: (counts[c], c))
            points = [(counts[c], r["per_class_recall"][c]) for c in order if r["per_class_recall"][c] is not None]
            ax.plot(*zip(*points), "o-", markersize=3, alpha=0.8, label=f"{_label(r, rows)} (n={r['n']})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test recall")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{panel[0]} {panel[1]} {panel[2]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)
