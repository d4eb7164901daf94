"""The names of the registries, declared once for the field table (DATASET.name, LOSS.name, ...) and checked
by each registry at import (check_registry): adding a dataset, a loss, a head or a model is its module, its
line in its registry and its name here."""

from __future__ import annotations

from bsdist.errors import BsdistError

# The registries' names, in their order. A dataset held in memory as one uint8 array (bsdist.data.datasets), or
# one that reads image files through lists or folders (bsdist.data.imagelist).
ARRAY_DATASET_NAMES = ("CIFAR10LT", "CIFAR100LT", "DigitsLT")
FILE_DATASET_NAMES = ("ImageList", "ImageNetLT", "PlacesLT", "iNat2018")
# DATASET.aug_info: the first two run on batches on the device (bsdist.data.augment); RandomResizedCrop crops
# image files as they are decoded (bsdist.data.imagefiles).
AUGMENTATION_NAMES = ("RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop")
LOSS_NAMES = ("CrossEntropyLoss", "BalancedSoftmax", "LogitAdjustedLoss", "LDAMLoss", "ClassBalancedLoss",
              "FocalLoss")  # bsdist.losses.LOSSES
HEAD_NAMES = ("cosine",)  # bsdist.models.heads.HEADS: MODEL.classifier other than linear
MODEL_NAMES = ("resnet32", "resnet10", "resnet18", "resnet50", "resnext50_32x4d", "resnet152")  # bsdist.models.zoo


def check_registry(registry: str, names, declared: tuple) -> None:
    """A registry (its names, in order) against the names declared here: a name added to one but not the
    other fails when the registry is imported, not when a run asks for it."""
    if tuple(names) != declared:
        raise BsdistError(f"{registry} holds {', '.join(names)} but bsdist/config/names.py declares "
                          f"{', '.join(declared)}; declare each name in both, in the same order")


def is_file_list(name: str) -> bool:
    """Whether DATASET.name reads image files through lists or folders (decoded as loaded)."""
    return name in FILE_DATASET_NAMES
