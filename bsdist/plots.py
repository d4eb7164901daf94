"""The report's pictures (matplotlib, installed with bsdist[report]): test accuracy and bcr against the
imbalance factor per dataset (report.png), and per-class recall against the class's training images
(report_classes.png). `rows` are the cells of `bsdist.report.aggregate`: mean and std over seeds."""

from __future__ import annotations

from bsdist.errors import BsdistError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BsdistError("the plots need matplotlib; install it with pip install 'bsdist[report]' "
                          "(report.md and report.csv were written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(r: dict, rows: list[dict]) -> str:
    label = r["method"] + (f" ({r['setting']})" if r["setting"] else "")
    return label + (f", selected on {r['selected_on']}" if len({x["selected_on"] for x in rows}) > 1 else "")


def _save(fig, path: str) -> None:
    """Lay the figure out, write it at 100 dpi and close it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7.5), squeeze=False)
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
    _save(fig, path)


def plot_classes(rows: list[dict], path: str) -> None:
    """Per-class test recall (mean over seeds) against the class's training images, log x, one line per method."""
    plt = _pyplot()
    from matplotlib import ticker
    panels = list(dict.fromkeys((r["dataset"], r["imbalance_type"], r["imbalance_factor"]) for r in rows))
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
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
    _save(fig, path)
