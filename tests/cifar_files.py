"""Small CIFAR files in the exact on-disk layout of the official python version.

Real CIFAR cannot be downloaded in tests, and torchvision's md5 checks reject generated files,
which is why bsdist reads the pickles itself.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

LAYOUTS = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels"),
}


def images_for(labels: np.ndarray, seed: int, learnable: bool = False) -> np.ndarray:
    """Random uint8 rows (N x 3072, channel-major like CIFAR) that depend on the label. By default uniform
    noise shifted by 23 x label modulo 256, which leaves every class the same distribution (nothing to
    learn); `learnable`: noise in [0, 128) plus 12 x label, so each class has its own mean brightness and
    a model's test accuracy rises well above chance."""
    rng = np.random.RandomState(seed)
    if learnable:
        return (rng.randint(0, 128, size=(len(labels), 3072)) + labels[:, None] * 12).clip(0, 255).astype(np.uint8)
    base = rng.randint(0, 256, size=(len(labels), 3072)).astype(np.int64)
    return ((base + labels[:, None] * 23) % 256).astype(np.uint8)


def write_cifar(root: str, num_classes: int = 10, train_per_class: int = 20, test_counts=None, seed: int = 0,
                learnable: bool = False) -> str:
    """Write a CIFAR-10 (or -100) directory under root; return root. Labels are shuffled like the real files.
    `learnable`: images whose classes differ (images_for)."""
    folder, train_files, test_files, meta, label_key = LAYOUTS[num_classes]
    base = os.path.join(root, folder)
    os.makedirs(base, exist_ok=True)
    rng = np.random.RandomState(seed)
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), train_per_class))
    test_counts = test_counts or [10] * num_classes
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), test_counts))
    for files, labels, offset in ((train_files, train_labels, 0), (test_files, test_labels, 1)):
        for i, (name, chunk) in enumerate(zip(files, np.array_split(np.arange(len(labels)), len(files)))):
            entry = {"batch_label": name, "data": images_for(labels[chunk], seed * 1000 + offset * 100 + i, learnable),
                     label_key: labels[chunk].tolist(), "filenames": [f"{i}.png" for i in chunk]}
            if num_classes == 100:
                entry["coarse_labels"] = (labels[chunk] // 5).tolist()
            with open(os.path.join(base, name), "wb") as f:
                pickle.dump(entry, f)
    names_key = "label_names" if num_classes == 10 else "fine_label_names"
    with open(os.path.join(base, meta), "wb") as f:
        pickle.dump({names_key: [f"class_{c}" for c in range(num_classes)]}, f)
    return root
