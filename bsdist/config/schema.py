"""The field table: every config key, as a field of a frozen dataclass per YAML section (sections/, one
module each), with its default, type, allowed values, check and help. It is the one source of the keys: the YAML layout,
validation, `configs/default.yaml`, the README's reference and typed access (`cfg.TRAIN.epochs`)
all come from it.

The names of the registries (datasets, augmentations, losses, heads, models) are declared in names.py, so
validation reads no registry and config imports none of data, losses or models; each registry checks at
import that it holds exactly the declared names (check_registry). This module stays free of torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bsdist.config.fields import Field, section
from bsdist.config.names import (  # noqa: F401  (re-exported: the registries import their names from here)
    ARRAY_DATASET_NAMES,
    AUGMENTATION_NAMES,
    FILE_DATASET_NAMES,
    HEAD_NAMES,
    LOSS_NAMES,
    MODEL_NAMES,
    check_registry,
    is_file_list,
)
from bsdist.config.sections.dataset import Dataset
from bsdist.config.sections.default import Default
from bsdist.config.sections.loss import Loss
from bsdist.config.sections.model import Model
from bsdist.config.sections.optimizer import Optimizer, Scheduler
from bsdist.config.sections.train import Crt, Train


@dataclass(frozen=True)
class Config:
    """A validated config: built only by `bsdist.config.validate`, never changed afterwards."""
    DEFAULT: Default = section(Default)
    DATASET: Dataset = section(Dataset)
    LOSS: Loss = section(Loss)
    OPTIMIZER: Optimizer = section(Optimizer)
    SCHEDULER: Scheduler = section(Scheduler)
    TRAIN: Train = section(Train)
    CRT: Crt = section(Crt)
    MODEL: Model = section(Model)


def _fields(cls=Config, prefix=""):
    """Yield (dotted key, Field) for every leaf of the table, in YAML order."""
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from _fields(f.metadata["section"], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata["field"]


FIELDS: dict[str, Field] = dict(_fields())


def build(flat: dict, cls=Config, prefix=""):
    """The dataclass tree of `cls` from {dotted key: value}; lists become tuples."""
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if "section" in f.metadata:
            values[f.name] = build(flat, f.metadata["section"], key + ".")
        else:
            values[f.name] = tuple(flat[key]) if isinstance(flat[key], list) else flat[key]
    return cls(**values)
