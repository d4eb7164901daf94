"""Image-list datasets on disk, generated: real 8x8 digits (scikit-learn) scaled up and tinted per class,
written as JPEG files (quality 90) in the published layouts: `path label` list files, or class folders;
and files that lie: headers claiming more pixels than they hold, a scan cut short, a large legitimate JPEG."""

from __future__ import annotations

import io
import os
import zlib

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


def encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def claiming(data: bytes, height: int, width: int) -> bytes:
    """A real JPEG or PNG file whose header claims height x width pixels, its pixel data unchanged: the
    JPEG's start-of-frame segment, or the PNG's IHDR (with its checksum made right again)."""
    data = bytearray(data)
    if data[:2] == b"\xff\xd8":
        at = 2
        while not (0xC0 <= data[at + 1] <= 0xCF and data[at + 1] not in (0xC4, 0xC8, 0xCC)):
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        data[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
        return bytes(data)
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def scan_cut_short(width: int = 640, height: int = 480) -> bytes:
    """A real-sized JPEG of noise whose scan stops half way, the file still closed by its end-of-image marker:
    libjpeg warns "Corrupt JPEG data: premature end of data segment" and fills the missing rows with grey."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(pixels), quality=90)
    return data[:len(data) // 2] + b"\xff\xd9"


def write_large_jpeg(path: str, width: int = 12000, height: int = 9000, cell: int = 750) -> None:
    """A width x height JPEG of flat cells of distinct colours (a crop in the wrong place shows), small and
    quick to encode: libjpeg-turbo codes flat 8 x 8 blocks in a few bits."""
    image = Image.new("RGB", (width, height))
    rng = np.random.default_rng(1)
    for top in range(0, height, cell):
        for left in range(0, width, cell):
            image.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (left, top, left + cell, top + cell))
    image.save(path, quality=90)
