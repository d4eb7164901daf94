"""Long-tailed datasets held in memory as one uint8 array (N x H x W x C) and int64 targets.

`CIFAR10LT` / `CIFAR100LT` read the official python pickles themselves (so generated files in the
same layout work) and download through torchvision's utilities with the official md5 sums.
`DigitsLT` is an offline demo built from scikit-learn's bundled 8x8 handwritten digits.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from bsdist.config.schema import ARRAY_DATASET_NAMES, check_registry
from bsdist.data.longtail import long_tail_split
from bsdist.errors import BsdistError


class ImageArrays(torch.utils.data.Dataset):
    """uint8 images (N x H x W x C) and int64 targets; `__getitems__` fetches a whole batch at once."""

    def __init__(self, data: np.ndarray, targets: np.ndarray):
        self.data = np.ascontiguousarray(data, dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.data[i]), int(self.targets[i])

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.data[idx]), torch.from_numpy(self.targets[idx]), torch.from_numpy(idx)


def collate_batch(batch):
    """`__getitems__` already returns a batch; the DataLoader must not collate it again."""
    return batch


class LongTailDataset(ImageArrays):
    """The training split made long-tailed (or the full balanced test split when train=False).

    Subclasses provide `num_classes`, `mean`, `std` and `_read(train) -> (data, targets)`.
    """

    num_classes: int
    mean: tuple
    std: tuple

    def __init__(self, root: str, train: bool = True, download: bool = False, imbalance_type: str | None = "exp",
                 imbalance_factor: float = 200, seed: int = 0, val_per_cls: int = 0):
        self.root = os.path.expanduser(root)
        if download:
            self.download(self.root)
        self.check_available(self.root, download=False)
        data, targets = self._read(train)
        self.val = None
        if train:
            keep, val_idx, counts = long_tail_split(targets, self.num_classes, imbalance_type, imbalance_factor, seed,
                                                    val_per_cls)
            if val_per_cls:
                self.val = ImageArrays(data[val_idx], targets[val_idx])
            data, targets = data[keep], targets[keep]
        super().__init__(data, targets)
        self.num_per_cls = {c: int(n) for c, n in enumerate(np.bincount(self.targets, minlength=self.num_classes))}
        self.class_names = self._class_names()

    def _class_names(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    @classmethod
    def check_available(cls, root: str, download: bool) -> None:
        """Raise one clear error when the files are missing and will not be downloaded."""

    @classmethod
    def download(cls, root: str) -> None:
        """Fetch the data into root when it is missing (datasets that ship with a package need nothing)."""

    def _read(self, train: bool):
        raise NotImplementedError


class _CIFAR(LongTailDataset):
    torchvision_class: str  # the torchvision dataset whose url, archive name and md5 we download with
    folder: str
    train_files: tuple
    test_files: tuple
    meta_file: str
    names_key: str
    label_key: str

    @classmethod
    def _expected(cls) -> list[str]:
        return [*cls.train_files, *cls.test_files, cls.meta_file]

    @classmethod
    def check_available(cls, root: str, download: bool) -> None:
        base = os.path.join(os.path.expanduser(root), cls.folder)
        missing = [f for f in cls._expected() if not os.path.isfile(os.path.join(base, f))]
        if missing and not download:
            raise BsdistError(f"{cls.__name__} data not found: {base} lacks {', '.join(missing)} (expected the "
                              f"official python layout {cls.folder}/{{{','.join(cls._expected())}}}); set "
                              f"DATASET.datadir to the directory that holds {cls.folder}/ or DATASET.download true")

    @classmethod
    def download(cls, root: str) -> None:
        root = os.path.expanduser(root)
        base = os.path.join(root, cls.folder)
        if all(os.path.isfile(os.path.join(base, f)) for f in cls._expected()):
            return
        import torchvision
        from torchvision.datasets.utils import download_and_extract_archive
        tv = getattr(torchvision.datasets, cls.torchvision_class)
        try:
            download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)
        except Exception as e:  # network errors come in many types; all mean the same to the user
            raise BsdistError(f"could not download {tv.url} into {root} ({type(e).__name__}: {str(e)[:120]}); "
                              f"place the extracted {cls.folder}/ there by hand and set DATASET.download "
                              "false") from None

    def _class_names(self) -> list[str]:
        """The names in the meta file (label_names, fine_label_names), or the class indices if it has none."""
        try:
            with open(os.path.join(self.root, self.folder, self.meta_file), "rb") as f:
                names = pickle.load(f, encoding="latin1")[self.names_key]
        except (OSError, KeyError, pickle.UnpicklingError, EOFError):
            names = None
        return ([str(n) for n in names] if names is not None and len(names) == self.num_classes
                else super()._class_names())

    def _read(self, train: bool):
        base = os.path.join(self.root, self.folder)
        data, targets = [], []
        for name in self.train_files if train else self.test_files:
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                batch = np.asarray(entry["data"], dtype=np.uint8)
                labels = np.asarray(entry[self.label_key], dtype=np.int64)
                batch = batch.reshape(len(labels), 3, 32, 32)
            except Exception as e:
                raise BsdistError(f"{path} is not a readable CIFAR batch ({type(e).__name__}: {str(e)[:80]}); "
                                  f"delete {base} and download it again (DATASET.download true)") from None
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise BsdistError(f"{path} has labels outside 0..{self.num_classes - 1}; it is not a "
                                  f"{self.__class__.__name__} file")
            data.append(batch.transpose(0, 2, 3, 1))
            targets.append(labels)
        return np.concatenate(data), np.concatenate(targets)


class CIFAR10LT(_CIFAR):
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    torchvision_class = "CIFAR10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    names_key = "label_names"
    label_key = "labels"


class CIFAR100LT(_CIFAR):
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    torchvision_class = "CIFAR100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    names_key = "fine_label_names"
    label_key = "fine_labels"


class DigitsLT(LongTailDataset):
    """scikit-learn's 1,797 real 8x8 handwritten digits, as one grey channel scaled to 0..255.

    A fixed (seed-independent) shuffle of each class gives a balanced pool of 120 training and 50
    test images per class; the long-tailed profile is applied to the training pool like CIFAR's.
    """

    num_classes = 10
    mean = (0.3055,)
    std = (0.3758,)
    train_per_cls, test_per_cls = 120, 50

    @classmethod
    def check_available(cls, root: str, download: bool) -> None:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            raise BsdistError("DigitsLT needs scikit-learn; install it with pip install 'bsdist[demo]'") from None

    def _read(self, train: bool):
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        rng = np.random.RandomState(0)
        chosen = []
        for c in range(self.num_classes):
            idx = rng.permutation(np.where(digits.target == c)[0])
            chosen.append(idx[:self.train_per_cls] if train
                          else idx[self.train_per_cls:self.train_per_cls + self.test_per_cls])
        chosen = np.concatenate(chosen)
        return images[chosen], digits.target[chosen].astype(np.int64)


ARRAY_DATASETS = {cls.__name__: cls for cls in (CIFAR10LT, CIFAR100LT, DigitsLT)}  # held in memory
check_registry("bsdist.data.datasets.ARRAY_DATASETS", ARRAY_DATASETS, ARRAY_DATASET_NAMES)
