import math

import pytest
import torch

from bsdist.metrics import (EvalTally, calibration_bins, confusion_matrix, describe_best, expected_calibration_error,
                            shot_groups, summarize)


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


def test_a_shot_group_averages_the_recall_of_its_classes():
    r = summarize(torch.tensor([[1, 1, 0], [0, 4, 0], [0, 0, 2]]), [300, 200, 5], 0.0)
    assert (r["many"], r["few"]) == pytest.approx((0.75, 1.0))


def test_ece_is_zero_for_a_perfectly_calibrated_predictor():
    # every image predicted class 0 with confidence 0.75 (log 3 margin over one rival), right 3 times in 4
    logits = torch.tensor([[math.log(3.0), 0.0]] * 8)
    targets = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    bins = calibration_bins(logits, targets)
    assert bins[11].tolist() == pytest.approx([8, 6, 6])  # 0.75 lies in (11/15, 12/15]
    assert bins.sum(0).tolist() == pytest.approx([8, 6, 6])
    assert expected_calibration_error(bins) == pytest.approx(0.0, abs=1e-6)  # float32 softmax


def test_ece_matches_a_hand_computation():
    # confidences 0.9 (right, right, wrong) and 0.6 (right): bins (13/15, 14/15] and (8/15, 9/15]
    p9, p6 = math.log(9.0), math.log(1.5)
    logits = torch.tensor([[p9, 0.0], [0.0, p9], [p9, 0.0], [p6, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    bins = calibration_bins(logits, targets)
    assert bins[13].tolist() == pytest.approx([3, 2.7, 2]) and bins[8].tolist() == pytest.approx([1, 0.6, 1])
    # (|2 - 2.7| + |1 - 0.6|) / 4
    assert expected_calibration_error(bins) == pytest.approx((0.7 + 0.4) / 4)
    assert expected_calibration_error(bins.tolist()) == pytest.approx((0.7 + 0.4) / 4)


def test_a_confidence_of_one_falls_in_the_last_bin_and_summarize_reports_calibration():
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    bins = calibration_bins(logits, torch.tensor([0, 0]))
    assert bins[14].tolist() == pytest.approx([2, 2, 1])
    r = summarize(confusion_matrix(logits.argmax(1), torch.tensor([0, 0]), 2), [200, 5], 3.0, bins)
    assert r["ece"] == pytest.approx(0.5) and r["nll"] == r["loss"] == 1.5 and r["calibration"] == bins.tolist()


@pytest.mark.parametrize("num_classes", [3, 150])
def test_the_tally_gives_the_same_metrics_with_a_confusion_matrix_or_per_class_counts(num_classes):
    from bsdist.metrics import CONFUSION_CLASSES, EvalTally
    torch.manual_seed(0)
    logits, targets = torch.randn(500, num_classes) * 2, torch.randint(0, num_classes, (500,))
    halves = []
    for part in (slice(0, 200), slice(200, 500)):  # two ranks' shards, summed as an all-reduce would
        tally = EvalTally(num_classes, torch.device("cpu"))
        tally.add(logits[part], targets[part])
        tally.add(logits[:0], targets[:0])  # an empty batch changes nothing
        halves.append(tally)
    names = {id(halves[0].counts): "counts", id(halves[0].loss_sum): "loss_sum",
             id(halves[0].calibration): "calibration"}
    halves[0].reduce(lambda t: t.add_(getattr(halves[1], names[id(t)])))
    r = halves[0].summary(list(range(num_classes, 0, -1)))
    predictions = logits.argmax(1)
    assert r["acc"] == pytest.approx((predictions == targets).float().mean().item())
    recall = [((predictions == c) & (targets == c)).sum().item() / max((targets == c).sum().item(), 1)
              for c in range(num_classes)]
    present = [x for c, x in enumerate(recall) if (targets == c).any()]
    assert r["bcr"] == pytest.approx(sum(present) / len(present))
    assert r["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    assert ("confusion" in r) == (num_classes <= CONFUSION_CLASSES) and r["num_images"] == 500


def test_a_confidence_at_most_one_bin_width_falls_in_the_first_bin():
    bins = calibration_bins(torch.zeros(2, 20), torch.tensor([0, 5]))  # confidence 1/20 among 20 classes
    assert bins[0].tolist() == pytest.approx([2, 0.1, 1])


def test_ece_of_one_image_is_its_calibration_gap():
    bins = calibration_bins(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]))  # right with confidence 0.75
    assert expected_calibration_error(bins) == pytest.approx(0.25)


def test_ece_from_lists_stays_exact_beyond_float32_integers():
    # results.json holds the bins as lists of floats; 2**24 + 1 is no float32 number
    assert expected_calibration_error([[2.0**24 + 1, 2.0**24, 2.0**24 + 1]]) == pytest.approx(1 / (2**24 + 1))


@pytest.mark.parametrize("num_classes, full", [(100, True), (101, False)])
def test_the_tally_keeps_a_confusion_matrix_up_to_100_classes(num_classes, full):
    tally = EvalTally(num_classes, torch.device("cpu"))
    tally.add(torch.eye(num_classes)[:3], torch.tensor([0, 1, 2]))
    assert ("confusion" in tally.summary([10] * num_classes)) == full


def test_the_tally_adds_up_batches_in_float64():
    torch.manual_seed(0)
    logits, targets = torch.randn(40, 5), torch.randint(0, 5, (40,))
    tally = EvalTally(5, torch.device("cpu"))
    tally.add(logits[:25], targets[:25])
    tally.add(logits[25:], targets[25:])
    r = tally.summary([10] * 5)
    # float64 sums of float32 confidences: float32 sums would be some units in the last float32 place off
    want = calibration_bins(logits, targets).flatten().tolist()
    assert sum(r["calibration"], []) == pytest.approx(want, rel=1e-12, abs=0)
    assert r["num_images"] == 40 and r["acc"] == pytest.approx((logits.argmax(1) == targets).double().mean().item())
    # a loss sum of 2**24 still takes log 2 (float32 would drop it)
    tally = EvalTally(2, torch.device("cpu"))
    tally.add(torch.tensor([[0.0, 2.0**24]]), torch.tensor([0]))
    tally.add(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    assert tally.summary([10, 10])["loss"] * 2 - 2**24 == pytest.approx(math.log(2), rel=1e-6)


def test_describe_best():
    assert describe_best({"epoch": 12, "acc": 0.25, "bcr": 0.125}) == "best (epoch 12) test acc 0.2500 bcr 0.1250"
