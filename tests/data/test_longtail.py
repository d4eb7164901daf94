"""Long-tailed counts and the standard (LDAM-DRW) split, checked against the literature's procedure."""

import numpy as np
import pytest

from bsdist.data.longtail import long_tail_counts, long_tail_split
from bsdist.errors import BsdistError


# ----------------------------------------------------------------------------------------------- counts

def test_exp_counts_cifar10_factor_200():
    assert long_tail_counts(50000, 10, "exp", 200) == [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25]


@pytest.mark.parametrize("num_classes, total", [(10, 12406), (100, 10847)])
def test_exp_counts_factor_100_total(num_classes, total):
    counts = long_tail_counts(50000, num_classes, "exp", 100)
    assert len(counts) == num_classes
    assert sum(counts) == total
    assert counts[0] == 50000 // num_classes
    assert counts[-1] == 50000 // num_classes // 100
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_step_counts():
    assert long_tail_counts(50000, 10, "step", 10) == [5000] * 5 + [500] * 5
    assert long_tail_counts(200, 10, "step", 2) == [20] * 5 + [10] * 5


@pytest.mark.parametrize("imbalance_type, factor", [("exp", 1), ("step", 1), (None, 1), (None, 100)])
def test_balanced_counts(imbalance_type, factor):
    assert long_tail_counts(50000, 10, imbalance_type, factor) == [5000] * 10


def test_counts_are_ints():
    assert all(type(n) is int for n in long_tail_counts(50000, 100, "exp", 100))


def test_factor_leaving_a_class_empty_raises_naming_the_class():
    # img_max 20, factor 50: 20 * 50 ** (-7/9) = 0.95 -> class 7 is the first empty one
    with pytest.raises(BsdistError, match=r"class 7\b") as e:
        long_tail_counts(200, 10, "exp", 50)
    assert "\n" not in str(e.value)


def test_empty_class_message_suggests_a_factor():
    with pytest.raises(BsdistError, match=r"DATASET\.imbalance_factor <= 20\b"):
        long_tail_counts(200, 10, "exp", 50)
    long_tail_counts(200, 10, "exp", 20)  # the suggested bound works here


@pytest.mark.parametrize("imbalance_type", ["exp", "step"])
def test_suggested_factor_bound_is_the_largest_that_works(imbalance_type):
    # 49 * (1/49) == 0.9999999999999999: the naive bound img_max would itself empty the tail
    with pytest.raises(BsdistError) as e:
        long_tail_counts(490, 10, imbalance_type, 80)
    bound = float(str(e.value).rsplit("<=", 1)[1].strip())
    assert min(long_tail_counts(490, 10, imbalance_type, bound)) >= 1
    with pytest.raises(BsdistError):
        long_tail_counts(490, 10, imbalance_type, bound + 1)


def test_with_fewer_than_two_images_per_class_only_a_balanced_set_is_suggested():
    with pytest.raises(BsdistError, match=r"img_max 1\.5\); use DATASET\.imbalance_factor <= 1$"):
        long_tail_counts(15, 10, "exp", 10)


@pytest.mark.parametrize("imbalance_type", ["exp", "step"])
def test_fewer_images_than_classes_is_one_line_not_a_bare_stop_iteration(imbalance_type):
    with pytest.raises(BsdistError, match=r"^5 training images for 10 classes leave no long tail to draw; set "
                                          r"DATASET\.imbalance_type null"):
        long_tail_counts(5, 10, imbalance_type, 10)
    with pytest.raises(BsdistError, match=r"^5 training images for 10 classes leave no long tail to draw$"):
        long_tail_counts(5, 10, None, 1)


def test_step_factor_leaving_tail_empty_raises():
    with pytest.raises(BsdistError, match=r"class 5\b"):
        long_tail_counts(200, 10, "step", 40)


def test_unknown_imbalance_type_raises():
    with pytest.raises(BsdistError, match="imbalance_type"):
        long_tail_counts(200, 10, "linear", 10)


# ------------------------------------------------------------------------------------------------ split

def reference_split(targets, counts, seed):
    """The procedure of Cao et al. (IMBALANCECIFAR10.gen_imbalanced_data), written out literally."""
    np.random.seed(seed)
    keep = []
    for c in range(len(counts)):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        keep.append(idx[:counts[c]])
    return np.concatenate(keep)


def shuffled_targets(num_classes, per_class, seed=7):
    return np.random.RandomState(seed).permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


@pytest.mark.parametrize("seed", [0, 1, 123])
@pytest.mark.parametrize("imbalance_type, factor", [("exp", 10), ("exp", 50), ("step", 10)])
@pytest.mark.parametrize("num_classes, per_class", [(10, 500), (100, 50)])
def test_split_is_bit_identical_to_reference(seed, imbalance_type, factor, num_classes, per_class):
    targets = shuffled_targets(num_classes, per_class)
    keep, val, counts = long_tail_split(targets, num_classes, imbalance_type, factor, seed)
    expected_counts = long_tail_counts(len(targets), num_classes, imbalance_type, factor)
    assert counts == expected_counts
    saved = np.random.get_state()
    try:
        expected = reference_split(targets, expected_counts, seed)
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(keep, expected)
    assert len(val) == 0
    assert np.array_equal(np.bincount(targets[keep], minlength=num_classes), expected_counts)


def test_split_depends_on_seed():
    targets = shuffled_targets(10, 500)
    a, _, _ = long_tail_split(targets, 10, "exp", 10, seed=0)
    b, _, _ = long_tail_split(targets, 10, "exp", 10, seed=1)
    assert len(a) == len(b)
    assert not np.array_equal(a, b)


def test_split_accepts_a_list_of_targets():
    targets = shuffled_targets(10, 50)
    a, _, _ = long_tail_split(targets.tolist(), 10, "exp", 10, seed=3)
    b, _, _ = long_tail_split(targets, 10, "exp", 10, seed=3)
    np.testing.assert_array_equal(a, b)


def test_split_leaves_global_numpy_state_alone():
    targets = shuffled_targets(10, 500)

    np.random.seed(2024)
    np.random.rand()
    expected = np.random.rand(5)

    np.random.seed(2024)
    np.random.rand()
    long_tail_split(targets, 10, "exp", 10, seed=0)
    long_tail_split(targets, 10, "step", 10, seed=5, val_per_cls=3)
    np.testing.assert_array_equal(np.random.rand(5), expected)


def test_split_restores_state_when_it_raises():
    # class 3 holds 30 images, the others 50: img_max = 480 / 10 = 48 and step keeps 48 of class 3
    targets = np.repeat(np.arange(10), 50)
    targets = np.concatenate([targets[targets != 3], np.full(30, 3)])
    np.random.seed(11)
    expected = np.random.rand(3)
    np.random.seed(11)
    with pytest.raises(BsdistError, match=r"class 3 has 30 "):
        long_tail_split(targets, 10, "step", 2, seed=0)
    np.testing.assert_array_equal(np.random.rand(3), expected)


# ---------------------------------------------------------------------------------------------- val split

@pytest.mark.parametrize("imbalance_type, factor", [("exp", 10), ("step", 10), (None, 1)])
@pytest.mark.parametrize("seed", [0, 123])
def test_val_split(imbalance_type, factor, seed):
    num_classes, per_class, v = 10, 500, 30
    targets = shuffled_targets(num_classes, per_class)
    keep0, val0, counts0 = long_tail_split(targets, num_classes, imbalance_type, factor, seed)
    keep, val, counts = long_tail_split(targets, num_classes, imbalance_type, factor, seed, val_per_cls=v)

    assert len(val0) == 0
    assert val.dtype == np.int64
    # counts follow img_max = N / C - val_per_cls
    assert counts == long_tail_counts(num_classes * (per_class - v), num_classes, imbalance_type, factor)
    assert counts[0] == per_class - v
    assert np.array_equal(np.bincount(targets[keep], minlength=num_classes), counts)
    # balanced validation, disjoint from training, no duplicates
    assert np.array_equal(np.bincount(targets[val], minlength=num_classes), [v] * num_classes)
    assert len(np.unique(val)) == len(val)
    assert not set(val.tolist()) & set(keep.tolist())
    # training images are a subset of the standard split: the prefix of each class's shuffled order
    assert set(keep.tolist()) <= set(keep0.tolist())
    start0 = start = 0
    for c in range(num_classes):
        np.testing.assert_array_equal(keep[start:start + counts[c]], keep0[start0:start0 + counts[c]])
        assert np.all(targets[keep[start:start + counts[c]]] == c)
        start, start0 = start + counts[c], start0 + counts0[c]


def test_val_split_takes_the_end_of_the_shuffled_order():
    targets = shuffled_targets(10, 100)
    seed, v = 5, 7
    keep, val, counts = long_tail_split(targets, 10, "exp", 10, seed, val_per_cls=v)
    saved = np.random.get_state()
    np.random.seed(seed)
    expected = []
    for c in range(10):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        expected.append(idx[-v:])
    np.random.set_state(saved)
    np.testing.assert_array_equal(val, np.concatenate(expected))


@pytest.mark.parametrize("v", [50, 51, 500])
def test_val_per_cls_at_least_smallest_class_raises(v):
    targets = shuffled_targets(10, 50)
    with pytest.raises(BsdistError, match=r"DATASET\.val_per_cls") as e:
        long_tail_split(targets, 10, "exp", 10, seed=0, val_per_cls=v)
    assert "\n" not in str(e.value)


def test_val_per_cls_against_uneven_smallest_class():
    targets = shuffled_targets(10, 50)
    targets = np.concatenate([targets[targets != 4], np.full(20, 4)])  # class 4 has 20 images
    with pytest.raises(BsdistError, match=r"DATASET\.val_per_cls 20 .*class 4"):
        long_tail_split(targets, 10, "exp", 2, seed=0, val_per_cls=20)


def test_a_class_without_images_is_named_when_validation_images_are_held_out():
    targets = shuffled_targets(10, 50)
    targets = targets[targets != 9]  # the last class is missing
    with pytest.raises(BsdistError, match=r"DATASET\.val_per_cls 2 leaves no training image of class 9 \(0 images\)"):
        long_tail_split(targets, 10, None, 1, seed=0, val_per_cls=2)


def test_a_class_short_of_its_training_images_plus_validation_raises():
    # img_max = 540 / 10 - 5 = 49: class 3 (first half of the step profile) needs 49 + 5 but holds 45
    targets = np.repeat(np.arange(10), 55)
    targets = np.concatenate([targets[targets != 3], np.full(45, 3)])
    with pytest.raises(BsdistError, match=r"class 3 has 45 training images but the long-tailed profile asks for 49 "):
        long_tail_split(targets, 10, "step", 2, seed=0, val_per_cls=5)
