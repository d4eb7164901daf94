"""Image files on disk: ImageNet-LT, Places-LT, iNaturalist 2018, or any list or class-per-folder tree.

Two layouts, both under DATASET.datadir:
- split lists in the published format, one `relative/path label` per line (labels 0..C-1; a path may
  hold spaces, the label is the last field; UTF-8 with or without a byte-order mark, CRLF line ends are
  fine), named by DATASET.train_list, val_list and test_list (relative to datadir, or absolute);
- without lists, a class-per-folder tree (torchvision's ImageFolder layout): train/<class>/...,
  val/<class>/... and test/<class>/..., classes sorted by folder name, their names kept for the report.

Presets fill in the lists as the decoupling paper's code distributes them, looked for in datadir unless
the list keys name them, and check the profile on load: another profile (a truncated download, the
wrong list) is one line saying what was expected and what was found.

The lists become ImageFiles (bsdist.data.imagefiles), made long-tailed and with a validation
hold-out as CIFAR is; any problem of the lists stops here, in one line pointing at --check-data.
"""

from __future__ import annotations

import codecs
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bsdist.config.schema import FILE_DATASET_NAMES, check_registry
from bsdist.data.imagefiles import CHECK_DATA_HINT, ImageFiles
from bsdist.errors import BsdistError

if TYPE_CHECKING:
    from bsdist.config.schema import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class Preset:
    lists: dict  # split -> list file name, as distributed with the decoupling paper's code
    num_classes: int
    profile: dict  # what a complete copy holds: split -> images; largest / smallest: training images per class


PRESETS = {
    "ImageNetLT": Preset({"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                          "test": "ImageNet_LT_test.txt"},
                         1000, {"train": 115846, "val": 20000, "test": 50000, "largest": 1280, "smallest": 5}),
    "PlacesLT": Preset({"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
                       365, {"train": 62500, "val": 7300, "test": 36500, "largest": 4980, "smallest": 5}),
    # the literature tests on iNaturalist 2018's validation list; it has no validation split of its own
    "iNat2018": Preset({"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"},
                       8142, {"train": 437513, "test": 24426}),
}
# The DATASET.name values that read image files: any list or folder tree, and the presets.
FILE_DATASETS = ("ImageList", *PRESETS)
check_registry("bsdist.data.imagelist.FILE_DATASETS", FILE_DATASETS, FILE_DATASET_NAMES)


@dataclass
class Listing:
    """A split as its list (or folder) names it: paths relative to root, labels, and what is wrong with it."""
    paths: list[str]
    labels: np.ndarray
    problems: list[str]
    source: str


def read_list(path: str, root: str, num_classes: int | None = None) -> Listing:
    """Parse a `relative/path label` list; problems (bad lines, duplicates, labels out of range) are collected."""
    if not os.path.isfile(path):
        return Listing([], np.zeros(0, np.int64), [f"list {path} does not exist"], path)
    with open(path, "rb") as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)  # the byte-order mark Notepad writes is no part of a path
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # one line for the list, not a "missing file" per mangled name
        number = data.count(b"\n", 0, e.start) + 1
        return Listing([], np.zeros(0, np.int64), [f"{path}:{number}: not UTF-8 (byte 0x{data[e.start]:02x}: "
                                                   f"{e.reason}); save the list as UTF-8"], path)
    paths, labels, problems, seen = [], [], [], {}
    for number, line in enumerate(io.StringIO(text, newline=""), 1):  # \n, \r\n and \r end a line
        line = line.strip()
        if not line:
            continue
        fields = line.rsplit(None, 1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            problems.append(f"{path}:{number}: not `relative/path label`: {line[:80]!r}")
            continue
        name, label = fields[0], int(fields[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            problems.append(f"{path}:{number}: label {label} outside 0..{(num_classes or 1) - 1}")
            continue
        if name in seen:
            problems.append(f"{path}:{number}: duplicate of line {seen[name]} ({name})")
            continue
        seen[name] = number
        paths.append(name)
        labels.append(label)
    return Listing(paths, np.asarray(labels, dtype=np.int64), problems, path)


def read_folders(root: str, split: str, classes: list[str] | None = None) -> tuple[Listing, list[str]]:
    """A class-per-folder split: root/split/<class>/<image>; classes from the folders (or as given)."""
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        return Listing([], np.zeros(0, np.int64), [f"folder {base} does not exist"], base), classes or []
    found = sorted(e.name for e in os.scandir(base) if e.is_dir())
    classes = classes if classes is not None else found
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, problems = [], [], []
    for name in found:
        if name not in index:
            problems.append(f"{base}/{name}: a class the training split does not have")
            continue
        for dirpath, _, files in sorted(os.walk(os.path.join(base, name))):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(os.path.relpath(os.path.join(dirpath, file), root))
                    labels.append(index[name])
    return Listing(paths, np.asarray(labels, dtype=np.int64), problems, base), classes


def list_path(root: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(root, name)


def listings(d: Dataset) -> tuple[dict[str, Listing], int, list[str] | None]:
    """Every split of an image-list dataset config: ({split: listing}, classes, class names or None)."""
    root, preset = d.datadir, PRESETS.get(d.name)
    names = {split: getattr(d, f"{split}_list") or (preset.lists.get(split) if preset else None)
             for split in ("train", "val", "test")}
    if names["train"] is None:  # class-per-folder
        train, classes = read_folders(root, "train")
        result = {"train": train}
        for split in ("val", "test"):
            if os.path.isdir(os.path.join(root, split)):
                result[split] = read_folders(root, split, classes)[0]
        return result, len(classes), classes
    train = read_list(list_path(root, names["train"]), root, preset.num_classes if preset else None)
    if not train.paths:  # absent, not UTF-8, or no usable line
        return {"train": train}, 0, None  # nothing to check the other lists against
    num_classes = preset.num_classes if preset else int(train.labels.max()) + 1
    result = {"train": train}
    for split in ("val", "test"):
        if names[split]:
            result[split] = read_list(list_path(root, names[split]), root, num_classes)
    return result, num_classes, None


def profile_problems(d: Dataset, splits: dict[str, Listing]) -> list[str]:
    """How the lists differ from the preset's published profile (nothing for other datasets)."""
    preset = PRESETS.get(d.name)
    if preset is None or "train" not in splits:
        return []
    counts = np.bincount(splits["train"].labels, minlength=preset.num_classes)
    found = {split: len(listing.paths) for split, listing in splits.items()}
    found.update(largest=int(counts.max()) if len(counts) else 0, smallest=int(counts.min()) if len(counts) else 0)
    return [f"{d.name} {key}: expected {value:,}, found {found.get(key, 0):,}"
            for key, value in preset.profile.items() if found.get(key) != value]


def load_splits(d: Dataset, seed: int, encoded: bool = False
                ) -> tuple[ImageFiles, dict[str, ImageFiles], int, list[str] | None]:
    """(training images, {"val", "test": evaluation images}, classes, class names) of an image-list
    config, made long-tailed (DATASET.imbalance_type) and with a validation hold-out (val_per_cls) as
    CIFAR is; encoded: read for decoding on the device (DecodeOnDevice). Any problem of the lists stops
    here, in one line pointing at --check-data."""
    from bsdist.data.longtail import long_tail_split
    splits, num_classes, class_names = listings(d)
    for listing in splits.values():
        if not os.path.exists(listing.source):
            raise BsdistError(f"{listing.problems[0]}; set DATASET.datadir to the folder that holds {d.name}'s "
                              "images and lists, or the DATASET.*_list keys to the lists' paths")
    problems = [p for listing in splits.values() for p in listing.problems] + profile_problems(d, splits)
    if "test" not in splits:
        problems.append(f"no test split: set DATASET.test_list, or add "
                        f"{os.path.join(d.datadir, 'test')}/<class>/ folders")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BsdistError(f"{problems[0]}{more}; {CHECK_DATA_HINT}")
    train = splits["train"]
    absent = sorted(set(range(num_classes)) - set(train.labels.tolist()))
    if absent:
        raise BsdistError(f"{train.source}: {len(absent)} of {num_classes} classes have no training image "
                          f"(e.g. class {absent[0]}); {CHECK_DATA_HINT}")
    if "val" in splits and d.val_per_cls:
        raise BsdistError(f"{splits['val'].source} is a validation split already; set DATASET.val_per_cls 0, or "
                          "drop the validation list to hold images out of training instead")
    keep, val_idx, _ = long_tail_split(train.labels, num_classes, d.imbalance_type, d.imbalance_factor, d.split_seed,
                                       d.val_per_cls)
    root, size = d.datadir, d.image_size
    random_crop = "RandomResizedCrop" in d.aug_info

    def files(listing: Listing, index=None, train_crop=False) -> ImageFiles:
        index = np.arange(len(listing.paths)) if index is None else index
        return ImageFiles(root, [listing.paths[i] for i in index], listing.labels[index], size, train_crop, seed,
                          encoded, d.max_image_pixels)

    held = {"val": files(train, val_idx)} if d.val_per_cls else {"val": files(splits["val"])} if "val" in splits else {}
    return files(train, keep, random_crop), {**held, "test": files(splits["test"])}, num_classes, class_names
