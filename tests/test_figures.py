"""TensorBoard's pictures: a labelled confusion matrix up to 20 classes, recall by training count beyond."""

import numpy as np

from bsdist.figures import LOG_FLOOR, class_figure, colour


def luminance(rgb):
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def test_the_colour_scale_is_logarithmic_and_an_empty_cell_white():
    assert colour(0) == (255, 255, 255)
    shares = [LOG_FLOOR, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    lum = [luminance(colour(s)) for s in shares]
    assert lum == sorted(lum) and len(set(lum)) == len(lum)  # a 1% confusion is distinguishable from 3% and 0.1%
    assert abs(luminance(colour(0.01)) - luminance(colour(LOG_FLOOR))) > 40


def test_a_confusion_matrix_is_drawn_with_its_cells_in_the_scale_colours():
    confusion = [[98, 2, 0], [1, 90, 9], [0, 0, 5]]
    image = class_figure({"confusion": confusion}, [100, 50, 5], ["cat", "dog", "bird"], "test confusion")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    for share in (0.98, 0.02, 0.01, 0.09, 1.0):  # every non-empty cell's colour appears
        assert colour(share) in colours, share
    assert image.shape[1] > 3 * 24 + 100  # room for names and the colour bar


def test_many_classes_are_drawn_as_recall_by_training_count():
    n = 40
    recall = [1.0] * (n - 1) + [None]  # every class fully recalled, the last absent from the split
    image = class_figure({"per_class_recall": recall}, list(range(400, 0, -10)), [str(c) for c in range(n)],
                         "test recall by class")
    assert image.shape[1] > image.shape[0]  # a wide bar chart, not a square heat map
    assert colour(1.0) in {tuple(p) for p in image.reshape(-1, 3)}  # full-recall bars
