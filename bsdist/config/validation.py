"""Validation: the raw config's types, ranges and cross-key rules checked once, the `auto` values that
depend on the data resolved, into a frozen Config."""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

from bsdist.config.device import check_device
from bsdist.config.loading import lookup, to_dict
from bsdist.config.schema import FIELDS, Config, Field, build, is_file_list
from bsdist.errors import BsdistError


def _coerce(key: str, f: Field, v: Any) -> Any:
    """Return v as the field's type, or raise naming the key, the value and what is expected."""
    if v is None:
        if f.nullable:
            return None
        raise BsdistError(f"{key} may not be null; set it to {_article(f.kind)} {f.kind} value, "
                          f"e.g. {key} {f.default}")
    bad = BsdistError(f"{key} must be {_describe(f)}, got {v!r} ({type(v).__name__})")
    if f.kind == "bool":
        if not isinstance(v, bool):
            raise bad
    elif f.kind == "auto_bool":
        if v != "auto" and not isinstance(v, bool):
            raise bad
    elif f.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
    elif f.kind == "float":
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise bad from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad
        v = float(v)
    elif f.kind in ("str", "choice"):
        if isinstance(v, bool) and {False: "no", True: "yes"}[v] in f.choices:
            v = {False: "no", True: "yes"}[v]  # YAML 1.1 reads `no` as false
        if not isinstance(v, str):
            raise bad
        if f.choices and v not in f.choices:
            near = (difflib.get_close_matches(v, f.choices, n=1)
                    or [c for c in f.choices if c.lower().startswith(v.lower())])
            hint = f"; did you mean {near[0]}?" if near else ""
            raise BsdistError(f"{key} must be one of {', '.join(f.choices)}, got {v!r}{hint}")
    elif f.kind == "list":
        if not isinstance(v, (list, tuple)):
            raise bad
        for item in v:
            if f.choices and item not in f.choices:
                raise BsdistError(f"{key} has unknown entry {item!r}; allowed: {', '.join(f.choices)}")
        v = list(v)
    if f.check is not None:
        problem = f.check(v)
        if problem:
            raise BsdistError(f"{key} {problem}, got {v!r}")
    return v


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(f: Field) -> str:
    kinds = {"auto_bool": "true, false or auto", "choice": "one of " + ", ".join(f.choices or ())}
    return kinds.get(f.kind, f"{_article(f.kind)} {f.kind}") + (" or null" if f.nullable else "")


def validate(raw: dict | Config, world_size: int = 1, device_here: bool = True) -> Config:
    """Check types, ranges and cross-key rules, resolve the `auto` values that depend on the data, and
    return the frozen Config. Raises BsdistError. A Config may be validated again (for another world size).

    device_here=False leaves the device checks to the machine that will train (a SLURM submission).
    """
    if isinstance(raw, Config):
        raw = to_dict(raw)
    flat = {key: _coerce(key, f, lookup(raw, key)) for key, f in FIELDS.items()}
    files = is_file_list(flat["DATASET.name"])
    if flat["DATASET.imbalance_type"] == "auto":
        flat["DATASET.imbalance_type"] = None if files else "exp"
        if files and flat["DATASET.imbalance_factor"] == FIELDS["DATASET.imbalance_factor"].default:
            flat["DATASET.imbalance_factor"] = 1.0  # the default factor is CIFAR's; a list is used as it is
    if flat["MODEL.stem"] == "auto":  # a 7x7 stride-2 stem and max-pool would leave a 32 px image 8 px wide
        flat["MODEL.stem"] = "imagenet" if files and flat["DATASET.image_size"] > 64 else "cifar"
    if flat["DEFAULT.exp_name"] is None:
        flat["DEFAULT.exp_name"] = default_exp_name(flat, files)
    cfg = build(flat)
    _check_rules(cfg, world_size, files)
    if device_here:
        check_device(cfg)
    return cfg


def _check_rules(cfg: Config, world_size: int, files: bool) -> None:
    """The rules that tie keys together."""
    dataset, train, optimizer, schedule = cfg.DATASET, cfg.TRAIN, cfg.OPTIMIZER, cfg.SCHEDULER.params
    if dataset.batch_size % world_size:
        raise BsdistError(f"DATASET.batch_size {dataset.batch_size} does not divide by the {world_size} processes; "
                          f"use a multiple of {world_size}")
    if optimizer.nesterov and optimizer.momentum == 0:
        raise BsdistError("OPTIMIZER.nesterov needs OPTIMIZER.momentum > 0; set a momentum or nesterov false")
    if schedule.warmup_epochs >= train.epochs:
        raise BsdistError(f"SCHEDULER.params.warmup_epochs {schedule.warmup_epochs} must be below TRAIN.epochs "
                          f"{train.epochs}")
    if cfg.SCHEDULER.sched_name == "multistep":
        milestones = list(schedule.milestones)
        if (not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < train.epochs for x in milestones)
                or milestones != sorted(set(milestones))):
            raise BsdistError(f"SCHEDULER.params.milestones must be increasing whole epochs between 1 and "
                              f"{train.epochs - 1}, got {milestones}")
    elif schedule.milestones:
        raise BsdistError("SCHEDULER.params.milestones is only used by multistep; remove it or set sched_name "
                          "multistep")
    if "RandomResizedCrop" in dataset.aug_info and not files:
        raise BsdistError(f"DATASET.aug_info RandomResizedCrop crops image files as they are decoded; {dataset.name} "
                          "is held in memory at its own size: use RandomCrop")
    if not files and (dataset.train_list or dataset.val_list or dataset.test_list):
        raise BsdistError(f"DATASET.train_list, val_list and test_list name image lists; {dataset.name} has its own "
                          "files: set DATASET.name ImageList (or a preset) to train from lists")
    if dataset.imbalance_type is None and dataset.imbalance_factor != 1:
        raise BsdistError(f"DATASET.imbalance_type null keeps every training image but imbalance_factor is "
                          f"{dataset.imbalance_factor}; set imbalance_type exp or step to draw a long tail, or "
                          "imbalance_factor 1")
    if len(set(dataset.aug_info)) != len(dataset.aug_info):
        raise BsdistError(f"DATASET.aug_info lists an augmentation twice: {list(dataset.aug_info)}")
    name = cfg.DEFAULT.exp_name
    if any(c in name for c in "/\\") or name in ("", ".", ".."):
        raise BsdistError(f"DEFAULT.exp_name {name!r} must be a plain directory name")


def default_exp_name(flat: dict, files: bool) -> str:
    """<loss>-<imbalance_type>-IF_<factor>; for a stage 2, <stage-1 run's name>-cRT-<loss>."""
    loss, stage1 = flat["LOSS.name"], flat["CRT.stage1"]
    if stage1:
        return f"{os.path.basename(os.path.normpath(stage1))}-cRT-{loss}"
    if flat["DATASET.imbalance_type"] is None and files:
        return f"{loss}-as_listed"
    return f"{loss}-{flat['DATASET.imbalance_type'] or 'balanced'}-IF_{flat['DATASET.imbalance_factor']:g}"


def run_dir(cfg: Config) -> str:
    return os.path.join(cfg.DEFAULT.savedir, cfg.DATASET.name, cfg.MODEL.name, cfg.DEFAULT.exp_name)
