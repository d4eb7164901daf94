"""The standard long-tailed subset of a balanced training set (Cao et al., LDAM-DRW, 2019).

Counts and image choice follow the procedure every CIFAR-LT paper uses, bit for bit, so results
compare with published numbers: seed numpy's legacy global generator, then for each class in
ascending order shuffle that class's indices and keep the first n. The caller's numpy random state
is restored afterwards.

A balanced validation split cannot come from images the standard subset leaves unused, because the
head class keeps all of its images. So `val_per_cls` images are held out from the end of each
class's shuffled indices and the profile is applied to what remains (img_max = N / C - val_per_cls):
the training images are then the first n'_c <= n_c of the same shuffled order, a subset of the
standard split, and with val_per_cls = 0 the split is exactly the standard one.
"""

from __future__ import annotations

import numpy as np

from bsdist.errors import BsdistError


def long_tail_counts(num_images: int, num_classes: int, imbalance_type: str | None, imbalance_factor: float) -> list[int]:
    """Images kept per class, with img_max = num_images / num_classes and gamma = 1 / imbalance_factor."""
    img_max = num_images / num_classes
    gamma = 1.0 / imbalance_factor
    if imbalance_type is None or imbalance_factor == 1:
        counts = [int(img_max)] * num_classes
    elif imbalance_type == "exp":
        counts = [int(img_max * (gamma ** (c / (num_classes - 1.0)))) for c in range(num_classes)]
    elif imbalance_type == "step":
        half = num_classes // 2
        counts = [int(img_max)] * half + [int(img_max * gamma)] * (num_classes - half)
    else:
        raise BsdistError(f"DATASET.imbalance_type must be exp, step or null, got {imbalance_type!r}")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise BsdistError(f"imbalance factor {imbalance_factor:g} leaves class {empty[0]} with no training image "
                          f"(img_max {img_max:g}); use DATASET.imbalance_factor <= {img_max:g}")
    return counts


def long_tail_split(targets, num_classes: int, imbalance_type: str | None, imbalance_factor: float,
                    seed: int, val_per_cls: int = 0):
    """(train indices stacked class by class, balanced validation indices, per-class train counts)."""
    targets = np.asarray(targets)
    per_class = np.bincount(targets, minlength=num_classes)
    if val_per_cls >= per_class.min():
        raise BsdistError(f"DATASET.val_per_cls {val_per_cls} leaves no training image of class {int(per_class.argmin())} "
                          f"({per_class.min()} images); use a val_per_cls below {per_class.min()}, or 0 to select on the test set")
    counts = long_tail_counts(len(targets) - num_classes * val_per_cls, num_classes, imbalance_type, imbalance_factor)
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        keep, val = [], []
        for c, n in enumerate(counts):
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            if len(idx) - val_per_cls < n:
                raise BsdistError(f"class {c} has {len(idx)} training images but the long-tailed profile asks for "
                                  f"{n} plus {val_per_cls} for validation; the data directory holds an incomplete dataset")
            keep.append(idx[:n])
            val.append(idx[len(idx) - val_per_cls:])
    finally:
        np.random.set_state(saved)
    return np.concatenate(keep), np.concatenate(val).astype(np.int64), counts
