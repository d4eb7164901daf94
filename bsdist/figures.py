"""Pictures for TensorBoard, drawn with Pillow (a torchvision dependency): the confusion matrix with its
axes, class names, colour bar and values up to 20 classes; beyond that, per-class recall against the
classes' training counts, since a heat map of hundreds of classes shows nothing; and the reliability
diagram of a split's confidences.

The colour scale is logarithmic from 0.1% to 100% of a row, so the 1-2% confusions that tell the tail
classes apart are visible; an empty cell stays white.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# viridis at five stops (matplotlib's), interpolated linearly
STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
LOG_FLOOR = 1e-3  # the share of a row at which the colour scale starts
MAX_HEATMAP_CLASSES = 20


def colour(share: float) -> tuple[int, int, int]:
    if share <= 0:
        return (255, 255, 255)
    t = (math.log10(max(share, LOG_FLOOR)) - math.log10(LOG_FLOOR)) / -math.log10(LOG_FLOOR)
    x = t * (len(STOPS) - 1)
    i = min(int(x), len(STOPS) - 2)
    return tuple(int(round(v)) for v in STOPS[i] + (x - i) * (STOPS[i + 1] - STOPS[i]))


def _font(size: int):
    return ImageFont.load_default(size=size)


def _text(draw, xy, text, size=12, fill=(0, 0, 0), anchor="la"):
    draw.text(xy, text, fill=fill, font=_font(size), anchor=anchor)


def class_figure(metrics: dict, num_per_cls: list[int], class_names: list[str], title: str) -> np.ndarray:
    """An evaluation's confusion matrix (up to 20 classes) or per-class recall by training count, as an
    RGB uint8 array."""
    if len(num_per_cls) <= MAX_HEATMAP_CLASSES:
        return confusion_figure(metrics["confusion"], class_names, title)
    return recall_by_count_figure(metrics["per_class_recall"], num_per_cls, title)


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str) -> np.ndarray:
    m = np.asarray(confusion, dtype=np.float64)
    shares = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(m)
    cell = max(24, min(48, 640 // n))
    label_w = 12 + 7 * max(len(name) for name in class_names)
    left, top = label_w + 30, 56
    width, height = left + n * cell + 90, top + n * cell + label_w + 32
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (10, 8), title, 15)
    _text(draw, (10, 30), "rows: true class, normalised to recall; columns: predicted class; colour: log share of "
          "the row", 11, (80, 80, 80))
    for r in range(n):
        for c in range(n):
            x, y = left + c * cell, top + r * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour(shares[r, c]), outline=(235, 235, 235))
            if m[r, c]:  # the share in percent, in black or white, whichever the cell's colour shows better
                value = f"{100 * shares[r, c]:.0f}" if shares[r, c] >= 0.01 else "<1"
                bright = np.dot(colour(shares[r, c]), (0.299, 0.587, 0.114)) > 140
                _text(draw, (x + cell / 2, y + cell / 2), value, max(9, cell // 3),
                      (0, 0, 0) if bright else (255, 255, 255), "mm")
        _text(draw, (left - 6, top + r * cell + cell / 2), class_names[r], 12, anchor="rm")
    for c in range(n):  # column names written downwards
        label = Image.new("RGBA", (label_w, 16), (255, 255, 255, 0))
        _text(ImageDraw.Draw(label), (label_w - 2, 8), class_names[c], 12, anchor="rm")
        rotated = label.rotate(90, expand=True)
        image.paste(rotated, (left + c * cell + cell // 2 - 8, top + n * cell + 4), rotated)
    _text(draw, (left + n * cell / 2, height - 14), "predicted class", 12, anchor="mm")
    label = Image.new("RGBA", (120, 16), (255, 255, 255, 0))
    _text(ImageDraw.Draw(label), (60, 8), "true class", 12, anchor="mm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (4, top + n * cell // 2 - 60), rotated)
    _colour_bar(draw, left + n * cell + 24, top, n * cell)
    return np.asarray(image)


def _colour_bar(draw, x: int, y: int, height: int) -> None:
    for i in range(height):
        share = 10 ** (math.log10(LOG_FLOOR) * i / max(height - 1, 1))
        draw.line([x, y + i, x + 16, y + i], fill=colour(share))
    for share, label in ((1, "100%"), (0.1, "10%"), (0.01, "1%"), (LOG_FLOOR, "0.1%")):
        ty = y + (height - 1) * math.log10(share) / math.log10(LOG_FLOOR)
        draw.line([x + 16, ty, x + 20, ty], fill=(0, 0, 0))
        _text(draw, (x + 24, ty), label, 11, anchor="lm")


def recall_by_count_figure(per_class_recall: list[float | None], num_per_cls: list[int], title: str) -> np.ndarray:
    """Per-class recall (None: a class absent from the split), classes sorted by training count (largest
    first), with the count drawn on a log scale above and the many / medium / few boundaries marked."""
    from bsdist.metrics import FEW_SHOT, MANY_SHOT
    recall = np.array([np.nan if r is None else r for r in per_class_recall], dtype=np.float64)
    order = np.argsort(-np.asarray(num_per_cls), kind="stable")
    counts = np.asarray(num_per_cls)[order]
    n = len(order)
    left, top, plot_w, plot_h = 60, 60, 900, 300
    image = Image.new("RGB", (left + plot_w + 50, top + plot_h + 70), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (10, 8), title, 15)
    _text(draw, (10, 30), f"per-class recall (bars) of {n} classes, sorted by training images (grey line, log "
          "scale)", 11, (80, 80, 80))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(120, 120, 120))
    bar = plot_w / n
    for i, c in enumerate(order):
        if not math.isnan(recall[c]):
            x0 = left + i * bar
            draw.rectangle([x0, top + plot_h * (1 - recall[c]), x0 + max(bar - 1, 1), top + plot_h],
                           fill=colour(recall[c]))
    log_max = math.log10(max(counts.max(), 1)) or 1
    points = [(left + (i + 0.5) * bar, top + plot_h * (1 - math.log10(max(v, 1)) / log_max))
              for i, v in enumerate(counts)]
    draw.line(points, fill=(90, 90, 90), width=2)
    for value in sorted({int(counts.max()), 1000, 100, 20, 1}):  # the training-count axis, on the right
        if 1 <= value <= counts.max():
            y = top + plot_h * (1 - math.log10(value) / log_max)
            draw.line([left + plot_w, y, left + plot_w + 4, y], fill=(90, 90, 90))
            _text(draw, (left + plot_w + 6, y), str(value), 11, (90, 90, 90), "lm")
    for value in (0, 0.25, 0.5, 0.75, 1):
        y = top + plot_h * (1 - value)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        _text(draw, (left - 6, y), f"{value:.2f}", 11, anchor="rm")
    for threshold, name in ((MANY_SHOT, "many | medium"), (FEW_SHOT - 1, "medium | few")):
        i = int(np.searchsorted(-counts, -threshold, side="right"))  # classes with more than threshold images
        if 0 < i < n:
            x = left + i * bar
            draw.line([x, top, x, top + plot_h], fill=(200, 40, 40), width=1)
            _text(draw, (x, top + plot_h + 6), name, 11, (200, 40, 40), "ma")
    _text(draw, (left + plot_w / 2, top + plot_h + 40), "classes, most training images first", 12, anchor="mm")
    return np.asarray(image)


def reliability_figure(bins: list[list[float]], title: str) -> np.ndarray:
    """Accuracy against confidence per equal-width bin (metrics.calibration_bins), with the diagonal of
    perfect calibration, each bin's gap to it shaded, and its share of the images drawn below."""
    from bsdist.metrics import expected_calibration_error
    table = np.asarray(bins, dtype=np.float64)
    count, confidence, correct = table[:, 0], table[:, 1], table[:, 2]
    k, total = len(table), max(count.sum(), 1.0)
    left, top, size, strip = 64, 60, 360, 60
    image = Image.new("RGB", (left + size + 150, top + size + strip + 60), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (10, 8), title, 15)
    _text(draw, (10, 30), f"ECE {expected_calibration_error(table):.4f} over {int(total)} images; blue: accuracy of a "
          "bin, red: its gap to the bin's mean confidence", 11, (80, 80, 80))
    gaps = Image.new("RGBA", image.size, (255, 255, 255, 0))
    gap_draw = ImageDraw.Draw(gaps)
    width = size / k
    for b in range(k):
        if not count[b]:
            continue
        x0, x1 = left + b * width, left + (b + 1) * width - 1
        accuracy, mean_confidence = correct[b] / count[b], confidence[b] / count[b]
        draw.rectangle([x0, top + size * (1 - accuracy), x1, top + size], fill=(59, 82, 139))
        low, high = sorted((accuracy, mean_confidence))
        gap_draw.rectangle([x0, top + size * (1 - high), x1, top + size * (1 - low)], fill=(220, 60, 60, 150))
        share = count[b] / total
        draw.rectangle([x0, top + size + strip * (1 - share) + 10, x1, top + size + strip + 10], fill=(150, 150, 150))
    image = Image.alpha_composite(image.convert("RGBA"), gaps).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + size, top + size], outline=(120, 120, 120))
    draw.line([left, top + size, left + size, top], fill=(0, 0, 0), width=1)
    for value in (0, 0.25, 0.5, 0.75, 1):
        y, x = top + size * (1 - value), left + size * value
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        _text(draw, (left - 6, y), f"{value:.2f}", 11, anchor="rm")
        _text(draw, (x, top + size + strip + 16), f"{value:.2f}", 11, anchor="ma")
    _text(draw, (left + size / 2, top + size + strip + 36), "confidence (top softmax probability)", 12, anchor="mm")
    _text(draw, (left - 6, top + size + strip / 2 + 10), "images", 11, (90, 90, 90), "rm")
    label = Image.new("RGBA", (120, 16), (255, 255, 255, 0))
    _text(ImageDraw.Draw(label), (60, 8), "accuracy", 12, anchor="mm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (4, top + size // 2 - 60), rotated)
    return np.asarray(image)
