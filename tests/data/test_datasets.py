"""CIFAR10LT / CIFAR100LT on generated files in the official layout, DigitsLT, and ShardSampler."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from cifar_files import write_cifar

from bsdist.data import ShardSampler
from bsdist.data.datasets import ARRAY_DATASETS, CIFAR10LT, CIFAR100LT, DigitsLT
from bsdist.data.longtail import long_tail_counts, long_tail_split
from bsdist.errors import BsdistError

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def raw_batches(root, folder, files):
    entries = []
    for name in files:
        with open(os.path.join(root, folder, name), "rb") as f:
            entries.append(pickle.load(f, encoding="latin1"))
    return entries


def raw_train_cifar10(root):
    entries = raw_batches(root, "cifar-10-batches-py", CIFAR10_FILES)
    rows = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries])
    labels = np.concatenate([np.asarray(e["labels"], dtype=np.int64) for e in entries])
    return rows, labels


def to_hwc(row):
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


# ---------------------------------------------------------------------------------------------- CIFAR-10

def test_registry():
    assert ARRAY_DATASETS == {"CIFAR10LT": CIFAR10LT, "CIFAR100LT": CIFAR100LT, "DigitsLT": DigitsLT}


def test_cifar10_train_reads_generated_files(cifar10_root):
    ds = CIFAR10LT(cifar10_root, train=True, imbalance_type="exp", imbalance_factor=10, seed=0)
    expected_counts = long_tail_counts(200, 10, "exp", 10)
    assert ds.data.dtype == np.uint8
    assert ds.data.shape == (sum(expected_counts), 32, 32, 3)
    assert ds.targets.dtype == np.int64
    assert len(ds) == sum(expected_counts)
    assert ds.num_per_cls == dict(enumerate(expected_counts))
    assert ds.val is None

    rows, labels = raw_train_cifar10(cifar10_root)
    keep, _, _ = long_tail_split(labels, 10, "exp", 10, 0)
    np.testing.assert_array_equal(ds.targets, labels[keep])
    # one image, checked by hand against the raw pickle row
    i = 3
    np.testing.assert_array_equal(ds.data[i], to_hwc(rows[keep[i]]))
    # and all of them
    np.testing.assert_array_equal(ds.data, rows[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar10_single_image_against_pickle(cifar10_root):
    ds = CIFAR10LT(cifar10_root, train=False)
    with open(os.path.join(cifar10_root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    row = np.asarray(entry["data"][17], dtype=np.uint8)
    img = ds.data[17]
    assert img.shape == (32, 32, 3)
    # pixel (y, x) of channel c sits at c * 1024 + y * 32 + x in the CIFAR row
    for c, y, x in [(0, 0, 0), (1, 5, 9), (2, 31, 30), (0, 12, 31)]:
        assert img[y, x, c] == row[c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(img, to_hwc(row))
    assert ds.targets[17] == entry["labels"][17]


def test_cifar10_test_split_is_full_and_ignores_imbalance(cifar10_root):
    a = CIFAR10LT(cifar10_root, train=False)
    b = CIFAR10LT(cifar10_root, train=False, imbalance_type="step", imbalance_factor=5, seed=9, val_per_cls=3)
    assert len(a) == 103
    assert a.data.shape == (103, 32, 32, 3)
    assert a.num_per_cls == {**{c: 10 for c in range(9)}, 9: 13}
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert a.val is None and b.val is None
    (entry,) = raw_batches(cifar10_root, "cifar-10-batches-py", ["test_batch"])
    np.testing.assert_array_equal(a.targets, entry["labels"])
    np.testing.assert_array_equal(a.data, np.asarray(entry["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar10_val_split(cifar10_root):
    ds = CIFAR10LT(cifar10_root, train=True, imbalance_type="exp", imbalance_factor=5, seed=1, val_per_cls=4)
    assert ds.num_per_cls == dict(enumerate(long_tail_counts(160, 10, "exp", 5)))
    assert ds.val is not None
    assert len(ds.val) == 40
    assert ds.val.data.shape == (40, 32, 32, 3)
    assert np.array_equal(np.bincount(ds.val.targets, minlength=10), [4] * 10)
    # (the generated batch files repeat rows, so disjointness is checked on indices, not pixels)
    rows, labels = raw_train_cifar10(cifar10_root)
    keep, val, _ = long_tail_split(labels, 10, "exp", 5, 1, val_per_cls=4)
    assert not set(keep.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(ds.data, rows[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.val.data, rows[val].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.val.targets, labels[val])
    assert ds.val.targets.dtype == np.int64 and ds.val.data.dtype == np.uint8


def test_cifar10_seed_changes_train_images(cifar10_root):
    a = CIFAR10LT(cifar10_root, train=True, imbalance_factor=10, seed=0)
    b = CIFAR10LT(cifar10_root, train=True, imbalance_factor=10, seed=1)
    assert a.num_per_cls == b.num_per_cls
    assert not np.array_equal(a.data, b.data)


def test_cifar10_default_factor_too_large_for_tiny_set(cifar10_root):
    # 20 images per class cannot make a factor-200 profile: the error names the emptied class
    with pytest.raises(BsdistError, match=r"class \d+"):
        CIFAR10LT(cifar10_root, train=True)


def test_getitems_returns_batch(cifar10_root):
    ds = CIFAR10LT(cifar10_root, train=False)
    idx = [5, 0, 102, 5, 40]
    images, targets, indices = ds.__getitems__(idx)
    assert images.dtype == torch.uint8 and images.shape == (5, 32, 32, 3)
    assert targets.dtype == torch.int64 and indices.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), ds.data[idx])
    np.testing.assert_array_equal(targets.numpy(), ds.targets[idx])
    assert indices.tolist() == idx
    image, target = ds[40]
    assert image.dtype == torch.uint8 and torch.equal(image, images[4])
    assert isinstance(target, int) and target == int(ds.targets[40])


# --------------------------------------------------------------------------------------------- CIFAR-100

def test_cifar100_reads_fine_labels(cifar100_root):
    test = CIFAR100LT(cifar100_root, train=False)
    (entry,) = raw_batches(cifar100_root, "cifar-100-python", ["test"])
    assert len(test) == 200
    np.testing.assert_array_equal(test.targets, entry["fine_labels"])
    assert not np.array_equal(test.targets, entry["coarse_labels"])
    assert test.targets.max() == 99
    np.testing.assert_array_equal(test.data, np.asarray(entry["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))

    train = CIFAR100LT(cifar100_root, train=True, imbalance_type="exp", imbalance_factor=2, seed=0)
    expected = long_tail_counts(600, 100, "exp", 2)
    assert train.num_per_cls == dict(enumerate(expected))
    assert train.data.shape == (sum(expected), 32, 32, 3)
    (tentry,) = raw_batches(cifar100_root, "cifar-100-python", ["train"])
    labels = np.asarray(tentry["fine_labels"])
    keep, _, _ = long_tail_split(labels, 100, "exp", 2, 0)
    np.testing.assert_array_equal(train.targets, labels[keep])
    np.testing.assert_array_equal(train.data[7], to_hwc(np.asarray(tentry["data"][keep[7]], dtype=np.uint8)))


def test_cifar100_step(cifar100_root):
    ds = CIFAR100LT(cifar100_root, train=True, imbalance_type="step", imbalance_factor=2, seed=4)
    assert list(ds.num_per_cls.values()) == [6] * 50 + [3] * 50


def test_cifar10_labels_out_of_range_raise(tmp_path):
    root = write_cifar(str(tmp_path), 10, train_per_class=2, test_counts=[1] * 10)
    path = os.path.join(root, "cifar-10-batches-py", "test_batch")
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 12]}, f)
    with pytest.raises(BsdistError, match="outside 0..9") as e:
        CIFAR10LT(root, train=False)
    assert path in str(e.value)


# ------------------------------------------------------------------------------------ missing / download

def test_missing_directory_without_download(tmp_path):
    root = str(tmp_path / "nothing-here")
    with pytest.raises(BsdistError) as e:
        CIFAR10LT(root, train=True, imbalance_factor=10)
    msg = str(e.value)
    assert os.path.join(root, "cifar-10-batches-py") in msg
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg
    assert "DATASET.datadir" in msg and "DATASET.download" in msg
    assert "\n" not in msg
    with pytest.raises(BsdistError, match="cifar-10-batches-py"):
        CIFAR10LT.check_available(root, download=False)
    CIFAR10LT.check_available(root, download=True)  # will be downloaded: no error


def test_missing_cifar100_names_its_layout(tmp_path):
    with pytest.raises(BsdistError) as e:
        CIFAR100LT(str(tmp_path), train=False)
    assert "cifar-100-python" in str(e.value) and "train" in str(e.value) and "meta" in str(e.value)


def test_missing_single_file_is_named(tmp_path):
    root = write_cifar(str(tmp_path), 10, train_per_class=2, test_counts=[1] * 10)
    os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_4"))
    with pytest.raises(BsdistError, match="lacks data_batch_4"):
        CIFAR10LT(root, train=False)


class FakeDownload:
    def __init__(self, num_classes, fail=None):
        self.calls, self.num_classes, self.fail = [], num_classes, fail

    def __call__(self, url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        self.calls.append(dict(url=url, download_root=download_root, extract_root=extract_root, filename=filename,
                               md5=md5))
        if self.fail:
            raise self.fail
        write_cifar(extract_root or download_root, self.num_classes, train_per_class=20,
                    test_counts=[5] * self.num_classes)


@pytest.mark.parametrize("cls, tv, num_classes", [(CIFAR10LT, torchvision.datasets.CIFAR10, 10),
                                                  (CIFAR100LT, torchvision.datasets.CIFAR100, 100)])
def test_download_uses_torchvision_with_md5(tmp_path, monkeypatch, cls, tv, num_classes):
    fake = FakeDownload(num_classes)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake)
    root = str(tmp_path / "data")
    ds = cls(root, train=False, download=True)
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["url"] == tv.url
    assert call["download_root"] == root
    assert call["extract_root"] in (None, root)
    assert call["filename"] == tv.filename
    assert call["md5"] == tv.tgz_md5
    assert len(ds) == 5 * num_classes


def test_no_download_when_files_present(cifar10_root, monkeypatch):
    fake = FakeDownload(10, fail=AssertionError("must not download"))
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake)
    ds = CIFAR10LT(cifar10_root, train=False, download=True)
    assert fake.calls == []
    assert len(ds) == 103


def test_download_failure_is_one_bsdist_error(tmp_path, monkeypatch):
    fake = FakeDownload(10, fail=OSError("network is unreachable"))
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake)
    with pytest.raises(BsdistError) as e:
        CIFAR10LT(str(tmp_path), train=False, download=True)
    msg = str(e.value)
    assert torchvision.datasets.CIFAR10.url in msg and "network is unreachable" in msg and "\n" not in msg


# --------------------------------------------------------------------------------------- corrupt files

@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not_a_dict"])
def test_corrupt_batch_names_the_file(tmp_path, damage):
    root = write_cifar(str(tmp_path), 10, train_per_class=4, test_counts=[2] * 10)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        if damage == "garbage":
            f.write(b"\x00\xffthis is not a pickle" * 10)
        elif damage == "truncated":
            f.write(raw[: len(raw) // 2])
        elif damage == "not_a_dict":
            pickle.dump([1, 2, 3], f)
    with pytest.raises(BsdistError) as e:
        CIFAR10LT(root, train=True, imbalance_factor=2)
    assert path in str(e.value)
    assert "\n" not in str(e.value)
    # the test split does not read the damaged file
    assert len(CIFAR10LT(root, train=False)) == 20


def test_wrong_row_size_names_the_file(tmp_path):
    root = write_cifar(str(tmp_path), 10, train_per_class=2, test_counts=[1] * 10)
    path = os.path.join(root, "cifar-10-batches-py", "test_batch")
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((10, 100), np.uint8), "labels": list(range(10))}, f)
    with pytest.raises(BsdistError, match="not a readable CIFAR batch") as e:
        CIFAR10LT(root, train=False)
    assert path in str(e.value)


# ----------------------------------------------------------------------------------------------- Digits

@pytest.fixture(scope="module")
def digits_test():
    return DigitsLT("unused", train=False)


def test_digits_test_set(digits_test):
    ds = digits_test
    assert DigitsLT.num_classes == 10
    assert ds.data.shape == (500, 8, 8, 1) and ds.data.dtype == np.uint8
    assert ds.targets.dtype == np.int64
    assert ds.num_per_cls == {c: 50 for c in range(10)}
    assert ds.data.max() == 255 and ds.data.min() == 0
    assert len(DigitsLT.mean) == len(DigitsLT.std) == 1


@pytest.mark.parametrize("imbalance_type, factor", [("exp", 10), ("exp", 100), ("step", 4)])
def test_digits_train_counts(imbalance_type, factor):
    ds = DigitsLT("unused", train=True, imbalance_type=imbalance_type, imbalance_factor=factor, seed=0)
    expected = long_tail_counts(1200, 10, imbalance_type, factor)
    assert expected[0] == 120
    assert ds.num_per_cls == dict(enumerate(expected))
    assert ds.data.shape == (sum(expected), 8, 8, 1) and ds.data.dtype == np.uint8


def test_digits_train_and_test_disjoint(digits_test):
    train = DigitsLT("unused", train=True, imbalance_type=None, imbalance_factor=1, seed=0)
    assert len(train) == 1200
    train_rows = {r.tobytes() for r in train.data}
    test_rows = {r.tobytes() for r in digits_test.data}
    assert len(test_rows) == 500
    assert not train_rows & test_rows


def test_digits_test_set_independent_of_seed(digits_test):
    for seed in (1, 17):
        other = DigitsLT("unused", train=False, imbalance_type="step", imbalance_factor=3, seed=seed)
        np.testing.assert_array_equal(other.data, digits_test.data)
        np.testing.assert_array_equal(other.targets, digits_test.targets)
    a = DigitsLT("unused", train=True, imbalance_factor=10, seed=1)
    b = DigitsLT("unused", train=True, imbalance_factor=10, seed=2)
    assert a.num_per_cls == b.num_per_cls
    assert not np.array_equal(a.data, b.data)


# ------------------------------------------------------------------------------------------ ShardSampler

@pytest.mark.parametrize("n", [103, 5, 1, 0, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_shard_sampler_covers_each_index_once(n, world_size):
    shards = [list(ShardSampler(n, r, world_size)) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    for r, s in enumerate(shards):
        assert len(ShardSampler(n, r, world_size)) == len(s)
        assert all(i % world_size == r for i in s)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sampler_103_over_4():
    lens = [len(ShardSampler(103, r, 4)) for r in range(4)]
    assert lens == [26, 26, 26, 25]
    assert list(ShardSampler(103, 3, 4))[:3] == [3, 7, 11]
