"""TensorBoard's pictures: a labelled confusion matrix on a log colour scale up to 20 classes, recall by
training count beyond, and the reliability diagram."""

import numpy as np

from bsdist.plots import LOG_FLOOR, class_figure, reliability_figure


def luminance(rgba):
    return float(np.dot(rgba[:3], (0.299, 0.587, 0.114)))


def test_the_colour_scale_is_logarithmic_and_an_empty_cell_white():
    confusion = [[98, 2, 0], [1, 90, 9], [0, 0, 5]]
    fig = class_figure({"confusion": confusion}, [100, 50, 5], ["cat", "dog", "bird"], "test confusion")
    image = fig.axes[0].images[0]
    assert tuple(image.to_rgba(image.get_array())[0, 2]) == (1.0, 1.0, 1.0, 1.0)  # no image: white, not the floor
    shares = [LOG_FLOOR, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    lum = [luminance(image.to_rgba(s)) for s in shares]
    assert lum == sorted(lum) and len(set(lum)) == len(lum)  # a 1% confusion is distinguishable from 3% and 0.1%
    assert luminance(image.to_rgba(0.01)) - luminance(image.to_rgba(LOG_FLOOR)) > 0.15


def test_a_confusion_matrix_names_its_classes_and_writes_each_cells_share():
    confusion = [[98, 2, 0], [1, 90, 9], [0, 0, 5]]
    fig = class_figure({"confusion": confusion}, [100, 50, 5], ["cat", "dog", "bird"], "test confusion")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["98", "2", "1", "90", "9", "100"])  # none for empty cells
    assert len(fig.axes) == 2  # and the colour bar


def test_many_classes_are_drawn_as_recall_by_training_count():
    n = 40
    recall = [1.0] * (n - 1) + [None]  # every class fully recalled, the last absent from the split
    fig = class_figure({"per_class_recall": recall}, list(range(400, 0, -10)), [str(c) for c in range(n)],
                       "test recall by class")
    width, height = fig.get_size_inches()
    assert width > height  # a wide bar chart, not a square heat map
    assert len(fig.axes[0].patches) == n - 1  # a bar per class present
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ["many | medium", "medium | few"]


def test_a_reliability_diagram_has_a_bar_per_filled_bin_and_names_the_ece():
    bins = [[0, 0.0, 0], [10, 6.0, 3], [30, 27.0, 27]]  # empty; 0.6 confident, 0.3 right; 0.9 and 0.9
    fig = reliability_figure(bins, "test reliability")
    accuracy, gap = fig.axes[0].containers
    assert [round(bar.get_height(), 6) for bar in accuracy] == [0.3, 0.9]
    assert [round(bar.get_height(), 6) for bar in gap] == [0.3, 0.0]  # shaded from accuracy up to the confidence
    assert "ECE 0.0750 over 40 images" in fig.axes[0].get_title()  # |3 - 6| / 40
