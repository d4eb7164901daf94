"""Image-list datasets on disk, generated: real 8x8 digits (scikit-learn) scaled up and tinted per class,
written as JPEG files (quality 90) in the published layouts: `path label` list files, or class folders."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def digit_images(count_per_class: list[int], size: int = 24, seed: int = 0) -> list[tuple[Image.Image, int]]:
    """(RGB image, label) pairs, label c drawn from digit c % 10, count_per_class[c] of each."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.RandomState(seed)
    out = []
    for c, n in enumerate(count_per_class):
        pool = np.where(digits.target == c % 10)[0]
        tint = rng.randint(64, 256, size=3)
        for i in rng.choice(pool, n, replace=n > len(pool)):
            grey = digits.images[i] / 16.0
            rgb = (grey[..., None] * tint[None, None, :]).astype(np.uint8)
            height = size + rng.randint(0, size // 2)  # not square: crops and resizes have work to do
            out.append((Image.fromarray(rgb).resize((size, height), Image.BILINEAR), c))
    return out


def write_list_dataset(root: str, train_counts: list[int], test_per_class: int, val_per_class: int = 0, size: int = 24,
                       crlf: bool = False) -> dict:
    """JPEG files under root/{train,val,test}/<class>/ and root/{train,val,test}.txt lists of them."""
    lists = {}
    splits = {"train": train_counts, "test": [test_per_class] * len(train_counts)}
    if val_per_class:
        splits["val"] = [val_per_class] * len(train_counts)
    for k, (split, counts) in enumerate(splits.items()):
        lines = []
        for j, (image, label) in enumerate(digit_images(counts, size, seed=k)):
            rel = os.path.join(split, f"c{label:03d}", f"{j:05d}.jpg")
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            image.save(os.path.join(root, rel), quality=90)
            lines.append(f"{rel} {label}")
        lists[split] = os.path.join(root, f"{split}.txt")
        with open(lists[split], "w", newline="") as f:
            f.write(("\r\n" if crlf else "\n").join(lines) + "\n")
    return lists


def write_folder_dataset(root: str, train_counts: list[int], test_per_class: int, names: list[str],
                         size: int = 24) -> None:
    """ImageFolder layout: root/train/<name>/*.jpg and root/test/<name>/*.jpg."""
    for k, (split, counts) in enumerate({"train": train_counts, "test": [test_per_class] * len(train_counts)}.items()):
        for j, (image, label) in enumerate(digit_images(counts, size, seed=k)):
            folder = os.path.join(root, split, names[label])
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, f"{j:05d}.jpg"), quality=90)


def append(list_path: str, line: str) -> None:
    with open(list_path, "a", newline="") as f:
        f.write(line + "\n")
