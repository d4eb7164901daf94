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


def long_tail_counts(num_images: int, num_classes: int, imbalance_type: str | None,
                     imbalance_factor: float) -> list[int]:
    """Images kept per class, with img_max = num_images / num_classes and gamma = 1 / imbalance_factor."""
    if imbalance_type not in (None, "exp", "step"):
        raise BsdistError(f"DATASET.imbalance_type must be exp, step or null, got {imbalance_type!r}")
    if num_images < num_classes:
        fix = "; set DATASET.imbalance_type null to use them as they are" if imbalance_type else ""
        raise BsdistError(f"{num_images} training images for {num_classes} classes leave no long tail to draw{fix}")
    counts = _profile(num_images / num_classes, num_classes, imbalance_type, imbalance_factor)
    if min(counts) == 0:
        img_max = num_images / num_classes
        # the float profile can empty the tail even at factor == img_max, so find the largest factor that works
        largest = next(f for f in range(max(int(img_max), 1), 0, -1)
                       if min(_profile(img_max, num_classes, imbalance_type, f)) > 0)
        raise BsdistError(f"imbalance factor {imbalance_factor:g} leaves class {counts.index(0)} with no training "
                          f"image (img_max {img_max:g}); use DATASET.imbalance_factor <= {largest}")
    return counts


def _profile(img_max: float, num_classes: int, imbalance_type: str | None, imbalance_factor: float) -> list[int]:
    gamma = 1.0 / imbalance_factor
    if imbalance_type is None or imbalance_factor == 1:
        return [int(img_max)] * num_classes
    if imbalance_type == "exp":
        return [int(img_max * (gamma ** (c / (num_classes - 1.0)))) for c in range(num_classes)]
    half = num_classes // 2
    return [int(img_max)] * half + [int(img_max * gamma)] * (num_classes - half)


def long_tail_split(targets, num_classes: int, imbalance_type: str | None, imbalance_factor: float,
                    seed: int, val_per_cls: int = 0):
    """(train indices stacked class by class, balanced validation indices, per-class train counts).

    imbalance_type None keeps every image of every class (but the validation ones): a balanced set
    as it is, and an image list that is long-tailed already."""
    targets = np.asarray(targets)
    per_class = np.bincount(targets, minlength=num_classes)
    if val_per_cls and val_per_cls >= per_class.min():
        raise BsdistError(f"DATASET.val_per_cls {val_per_cls} leaves no training image of class "
                          f"{int(per_class.argmin())} ({per_class.min()} images); use a val_per_cls below "
                          f"{per_class.min()}, or 0 to select on the test set")
    if imbalance_type is None:  # every image but the validation ones (a balanced set stays balanced, a list as it is)
        counts = [int(n) - val_per_cls for n in per_class]
    else:
        counts = long_tail_counts(len(targets) - num_classes * val_per_cls, num_classes, imbalance_type,
                                  imbalance_factor)
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        keep, val = [], []
        for c, n in enumerate(counts):
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            if len(idx) - val_per_cls < n:
                raise BsdistError(f"class {c} has {len(idx)} training images but the long-tailed profile asks for "
                                  f"{n} plus {val_per_cls} for validation; the data directory holds an incomplete "
                                  "dataset")
            keep.append(idx[:n])
            val.append(idx[len(idx) - val_per_cls:])
    finally:
        np.random.set_state(saved)
    return np.concatenate(keep), np.concatenate(val).astype(np.int64), counts
