import math

import pytest
import torch

from bsdist.metrics import confusion_matrix, shot_groups, summarize


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    m = confusion_matrix(preds, targets, 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_shot_groups_use_the_training_counts():
    groups = shot_groups([500, 101, 100, 20, 19, 1])
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def test_summarize_gives_accuracy_bcr_shots_and_loss():
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 5, 5]])
    r = summarize(confusion, [200, 50, 5], loss_sum=12.0)
    assert r["acc"] == pytest.approx(16 / 24)
    recalls = [0.8, 0.75, 0.5]
    assert r["per_class_recall"] == pytest.approx(recalls)
    assert r["bcr"] == pytest.approx(sum(recalls) / 3)
    assert (r["many"], r["medium"], r["few"]) == pytest.approx((0.8, 0.75, 0.5))
    assert r["loss"] == pytest.approx(0.5)
    assert r["num_images"] == 24
    assert r["confusion"] == confusion.tolist()


def test_bcr_differs_from_accuracy_on_an_imbalanced_test_set():
    confusion = torch.tensor([[90, 0], [10, 0]])  # predicts the head class always
    r = summarize(confusion, [1000, 10], 0.0)
    assert r["acc"] == pytest.approx(0.9) and r["bcr"] == pytest.approx(0.5)


def test_classes_absent_from_the_split_are_left_out_of_bcr_and_empty_groups_are_none():
    confusion = torch.tensor([[3, 1], [0, 0]])
    r = summarize(confusion, [300, 200], 0.0)
    assert r["per_class_recall"][1] is None
    assert r["bcr"] == pytest.approx(0.75)
    assert r["medium"] is None and r["few"] is None and not math.isnan(r["many"])
