"""Config as data: one schema, YAML files on top of it, `KEY.SUB value` overrides on top of those.

The schema below is the single source of the defaults, the types, the allowed values and the help
text; `configs/default.yaml` and the README's config reference are generated from it
(`python -m bsdist.config`). Everything is validated once, before any process group or run
directory exists, and every mistake is one `BsdistError` line naming the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from bsdist.errors import BsdistError

ARRAY_DATASETS = ("CIFAR10LT", "CIFAR100LT", "DigitsLT")  # held in memory (bsdist.data.datasets)
FILE_DATASETS = ("ImageList", "ImageNetLT", "PlacesLT", "iNat2018")  # image files (bsdist.data.imagelist)
DATASETS = ARRAY_DATASETS + FILE_DATASETS
LOSSES = ("CrossEntropyLoss", "BalancedSoftmax")
AUGMENTATIONS = ("RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop")


@dataclass(frozen=True)
class Field:
    default: Any
    kind: str  # int, float, str, bool, list, choice, auto_bool
    help: str
    choices: tuple = ()
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _at_least_one(v):
    return None if v >= 1 else "must be >= 1"


SCHEMA: dict[str, dict[str, Any]] = {
    "DEFAULT": {
        "seed": Field(0, "int", "seed of model initialisation, shuffling and augmentation; runs with several seeds share one long-tailed subset (DATASET.split_seed)", check=_non_negative),
        "savedir": Field("./results", "str", "root of run directories: <savedir>/<dataset>/<model>/<exp_name>"),
        "exp_name": Field(None, "str", "run name; null derives <loss>-<imbalance_type>-IF_<factor> (a stage 2: <stage-1 run>-cRT-<loss>)", nullable=True),
    },
    "DATASET": {
        "name": Field("CIFAR10LT", "choice", "dataset: CIFAR-LT and the offline digits held in memory; ImageList (split lists or a class-per-folder tree) and its presets ImageNetLT, PlacesLT, iNat2018 read image files", choices=DATASETS),
        "datadir": Field("./data", "str", "directory holding cifar-10-batches-py/ or cifar-100-python/, or the images (and split lists) of an image-list dataset"),
        "train_list": Field(None, "str", "image-list datasets: the training list (`relative/path label` lines; relative to datadir, or absolute); null takes the preset's, or train/<class>/ folders", nullable=True),
        "val_list": Field(None, "str", "image-list datasets: the validation list; null takes the preset's, or val/<class>/ folders where they exist", nullable=True),
        "test_list": Field(None, "str", "image-list datasets: the test list; null takes the preset's, or test/<class>/ folders", nullable=True),
        "image_size": Field(224, "int", "image-list datasets: side of the square training and evaluation images (evaluation resizes the shorter side to image_size * 256 / 224 and crops the centre)", check=_positive),
        "download": Field(False, "bool", "download CIFAR (md5-checked) into datadir when missing"),
        "batch_size": Field(32, "int", "global images per step, split evenly across processes", check=_positive),
        "test_batch_size": Field(1024, "int", "images per evaluation batch on each process", check=_positive),
        "loader": Field("auto", "choice", "device: the uint8 dataset lives on the training device and batches are gathered there; dataloader: DataLoader workers feed batches from host memory; auto: device when the data fits", choices=("auto", "device", "dataloader")),
        "sampler": Field("instance", "choice", "training order: instance draws every image once per epoch (DistributedSampler); class_balanced draws classes equally often (each image of a class equally likely), the epoch keeping its number of images: cRT's sampler", choices=("instance", "class_balanced")),
        "num_workers": Field(2, "int", "DataLoader worker processes per training process (loader dataloader)", check=_non_negative),
        "imbalance_type": Field("auto", "choice", "long-tail profile drawn from the training images; null keeps them all (a balanced set stays balanced, a list as it is); auto is exp for CIFAR and digits and null for image lists", choices=("auto", "exp", "step"), nullable=True),
        "split_seed": Field(0, "int", "seed of the long-tailed subset and the validation hold-out; 0 is the standard subset of LDAM-DRW and the reference trainer", check=_non_negative),
        "imbalance_factor": Field(100.0, "float", "largest / smallest class count (1 = balanced)", check=_at_least_one),
        "val_per_cls": Field(0, "int", "balanced validation images per class, taken from training images the long-tailed subset left unused; 0 selects the best model on the test set", check=_non_negative),
        "aug_info": Field(["RandomCrop", "RandomHorizontalFlip"], "list", "training augmentations, applied per batch on the device", choices=AUGMENTATIONS),
        "crop_padding": Field(4, "int", "zero padding of RandomCrop, in pixels", check=_non_negative),
    },
    "LOSS": {
        "name": Field("BalancedSoftmax", "choice", "training loss", choices=LOSSES),
    },
    "OPTIMIZER": {
        "name": Field("SGD", "choice", "optimiser", choices=("SGD",)),
        "lr": Field(0.1, "float", "peak learning rate", check=_positive),
        "momentum": Field(0.0, "float", "SGD momentum", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "weight_decay": Field(0.0, "float", "L2 weight decay", check=_non_negative),
        "nesterov": Field(False, "bool", "Nesterov momentum (needs momentum > 0)"),
    },
    "SCHEDULER": {
        "sched_name": Field("cosine_annealing", "choice", "learning-rate schedule, stepped every optimiser step", choices=("cosine_annealing", "multistep")),
        "params": {
            "t_initial": Field(None, "float", "epochs in the first cosine cycle; null means all epochs after warmup", nullable=True, check=_positive),
            "t_mult": Field(1.0, "float", "growth of each cosine cycle (warm restarts)", check=_at_least_one),
            "eta_min": Field(1e-5, "float", "lowest learning rate of the cosine schedule", check=_non_negative),
            "milestones": Field([], "list", "epochs at which multistep multiplies the learning rate by gamma"),
            "gamma": Field(0.1, "float", "multistep factor", check=_positive),
            "warmup_epochs": Field(0.0, "float", "linear warmup from 0 to lr over this many epochs", check=_non_negative),
        },
    },
    "TRAIN": {
        "epochs": Field(50, "int", "training epochs", check=_at_least_one),
        "grad_accum_steps": Field(1, "int", "micro-batches per optimiser step (DDP no_sync on the inner ones)", check=_at_least_one),
        "mixed_precision": Field("auto", "choice", "autocast dtype; fp16 adds a gradient scaler; auto is bf16 on CUDA (fp16 where the GPU lacks bf16) and no on CPU, where bf16 is emulated and slow", choices=("auto", "fp16", "bf16", "no")),
        "log_interval": Field(10, "int", "optimiser steps between console lines", check=_at_least_one),
        "ckp_metric": Field("bcr", "choice", "metric choosing best.pt (lower is better for loss)", choices=("bcr", "acc", "loss")),
        "compile": Field("auto", "auto_bool", "torch.compile the model; auto compiles on CUDA only"),
        "ddp_bucket_mb": Field(25.0, "float", "size of DDP's gradient all-reduce buckets in MB (ResNet-18's gradients are 45 MB in fp32); at least DDP's 1 MB first bucket, which torch.compile's split at the buckets requires", check=_at_least_one),
        "device": Field("auto", "choice", "training device; auto picks cuda when available, and refuses to train on the CPU of a node whose GPUs CUDA cannot see", choices=("auto", "cuda", "cpu")),
        "dist_backend": Field("auto", "choice", "collectives: auto is NCCL for CUDA tensors (gloo for host objects) and gloo on CPU; gloo on CUDA is slow but lets several processes share one GPU", choices=("auto", "gloo")),
        "ckpt_every_steps": Field(0, "int", "also write last.pt every this many optimiser steps inside an epoch (0: at epoch ends only); a resume continues from that exact step", check=_non_negative),
        "check_every_steps": Field(20, "int", "optimiser steps between the host's reads of what the processes agree on (stop signals, non-finite losses), besides every log point and checkpoint; the step itself never waits for the device, so a signal or a non-finite loss is acted on up to this many steps later", check=_at_least_one),
        "nonfinite": Field("stop", "choice", "on a non-finite loss (seen by all ranks at the same step): stop, keeping the last good checkpoint, or skip the step", choices=("stop", "skip")),
        "resume": Field(False, "auto_bool", "auto continues the run in the run directory from last.pt, or starts it; true must continue one; false refuses a directory that holds a run (a checkpoint or results)"),
        "dist_timeout_s": Field(600, "int", "timeout of every collective after the first epoch, in seconds: a peer that dies or hangs stops the others within it", check=_positive),
        "dist_startup_timeout_s": Field(1800, "int", "the collectives' timeout from start-up through the first epoch (data download, compilation), in seconds", check=_positive),
    },
    "CRT": {
        "stage1": Field(None, "str", "decoupled stage 2 (classifier re-training, cRT): the run directory of a finished stage-1 run whose selected model (best.pt) this run loads and freezes (BatchNorm included), training only a re-initialised classifier; null: a run of its own", nullable=True),
    },
    "MODEL": {
        "name": Field("resnet18", "str", "model: resnet32 (the CIFAR ResNet of LDAM-DRW and BALMS), resnet10, resnet18, resnet50, resnext50_32x4d, resnet152 (see bsdist.models.zoo)"),
        "stem": Field("auto", "choice", "first layers: cifar (3x3 stride-1 convolution, no max-pool) or imagenet (7x7 stride-2 and max-pool); auto is cifar up to 64 px images (CIFAR, digits, image lists at DATASET.image_size <= 64) and imagenet above", choices=("auto", "cifar", "imagenet")),
        "pretrained": Field(None, "str", "a local weights file (a state dict, or a checkpoint holding one) to start from, read with weights_only; the classifier starts afresh when its class count differs; nothing is downloaded", nullable=True),
        "sync_bn": Field("auto", "auto_bool", "BatchNorm statistics over the global batch (all processes' images), as one process with the same batch computes them; auto: when several processes each hold fewer than MODEL.sync_bn_batch images"),
        "sync_bn_batch": Field(32, "int", "with MODEL.sync_bn auto, the per-process batch below which BatchNorm synchronises", check=_positive),
    },
}

# Keys that may differ between a run and its resumption: they change speed or logging, never results.
RESUMABLE_CHANGES = {"TRAIN.resume", "TRAIN.log_interval", "TRAIN.compile", "DATASET.num_workers", "TRAIN.ckpt_every_steps",
                     "TRAIN.nonfinite", "DATASET.loader", "TRAIN.check_every_steps", "TRAIN.dist_backend", "TRAIN.ddp_bucket_mb",
                     "DATASET.test_batch_size", "DATASET.download", "DATASET.datadir", "TRAIN.dist_timeout_s",
                     "TRAIN.dist_startup_timeout_s", "TRAIN.device"}  # TRAIN.device: a GPU run may continue on CPU, and back


def _fields(schema=SCHEMA, prefix=""):
    """Yield (dotted key, Field) for every leaf of the schema."""
    for name, node in schema.items():
        key = f"{prefix}{name}"
        if isinstance(node, Field):
            yield key, node
        else:
            yield from _fields(node, key + ".")


FIELDS = dict(_fields())


def defaults() -> dict:
    def build(node):
        return {k: build(v) for k, v in node.items()} if isinstance(node, dict) else copy.deepcopy(node.default)
    return build(SCHEMA)


def _unknown_key(key: str) -> BsdistError:
    near = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else "; run `python -m bsdist.config` to list the keys"
    return BsdistError(f"unknown config key {key}{hint}")


def _set(cfg: dict, key: str, value: Any) -> None:
    if key not in FIELDS:
        raise _unknown_key(key)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def get(cfg: dict, key: str) -> Any:
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def _flatten(tree: dict, prefix: str = "", where: str = "") -> dict:
    """Dotted keys of a YAML tree; a mapping under a leaf key (or a value under a section) is an error."""
    flat = {}
    if not isinstance(tree, dict):
        raise BsdistError(f"{where or 'config'} must be a mapping of sections, got {type(tree).__name__}")
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in FIELDS:
            flat[key] = value
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in FIELDS):
            flat.update(_flatten(value, key + ".", where))
        else:
            raise _unknown_key(key)
    return flat


def read_yaml(path: str, what: str, example: str):
    """The parsed YAML file (an empty file is {}), or one error naming the file and the problem."""
    if not os.path.isfile(path):
        raise BsdistError(f"{what} {path} does not exist; pass a YAML file such as {example}")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise BsdistError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def load(path: str | None, overrides: list[str] = ()) -> dict:
    """Defaults, then the YAML file, then `KEY.SUB value` pairs (values parsed as YAML). Not validated."""
    cfg = defaults()
    if path is not None:
        tree = read_yaml(path, "config file", "configs/demo.yaml")
        for key, value in _flatten(tree, where=path).items():
            _set(cfg, key, value)
    if len(overrides) % 2:
        raise BsdistError(f"override {overrides[-1]} has no value; overrides come in pairs: KEY.SUB value")
    for key, text in zip(overrides[::2], overrides[1::2]):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set(cfg, key, value)
    return cfg


def _coerce(key: str, f: Field, v: Any) -> Any:
    """Return v as the field's type, or raise naming the key, the value and what is expected."""
    if v is None:
        if f.nullable:
            return None
        raise BsdistError(f"{key} may not be null; set it to {_article(f.kind)} {f.kind} value, e.g. {key} {f.default}")
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
            near = difflib.get_close_matches(v, f.choices, n=1) or [c for c in f.choices if c.lower().startswith(v.lower())]
            hint = f"; did you mean {near[0]}?" if near else ""
            raise BsdistError(f"{key} must be one of {', '.join(f.choices)}, got {v!r}{hint}")
    elif f.kind == "list":
        if not isinstance(v, list):
            raise bad
        for item in v:
            if f.choices and item not in f.choices:
                raise BsdistError(f"{key} has unknown entry {item!r}; allowed: {', '.join(f.choices)}")
    if f.check is not None and v is not None:
        problem = f.check(v)
        if problem:
            raise BsdistError(f"{key} {problem}, got {v!r}")
    return v


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(f: Field) -> str:
    kind = {"auto_bool": "true, false or auto", "choice": "one of " + ", ".join(f.choices or ())}.get(f.kind, f"{_article(f.kind)} {f.kind}")
    return kind + (" or null" if f.nullable else "")


def validate(cfg: dict, world_size: int = 1, device_here: bool = True) -> dict:
    """Check types, ranges and cross-key rules; return the normalised config. Raises BsdistError.

    device_here=False leaves the device checks to the machine that will train (a SLURM submission).
    """
    cfg = copy.deepcopy(cfg)
    for key, f in FIELDS.items():
        _set(cfg, key, _coerce(key, f, get(cfg, key)))
    from bsdist.models import MODELS  # the registry decides which names are valid

    d, t, o, s = cfg["DATASET"], cfg["TRAIN"], cfg["OPTIMIZER"], cfg["SCHEDULER"]["params"]
    if cfg["MODEL"]["name"] not in MODELS:
        raise BsdistError(f"MODEL.name must be one of {', '.join(sorted(MODELS))}, got {cfg['MODEL']['name']!r}")
    if d["batch_size"] % world_size:
        raise BsdistError(f"DATASET.batch_size {d['batch_size']} does not divide by the {world_size} processes; "
                          f"use a multiple of {world_size}")
    if o["nesterov"] and o["momentum"] == 0:
        raise BsdistError("OPTIMIZER.nesterov needs OPTIMIZER.momentum > 0; set a momentum or nesterov false")
    if s["warmup_epochs"] >= t["epochs"]:
        raise BsdistError(f"SCHEDULER.params.warmup_epochs {s['warmup_epochs']} must be below TRAIN.epochs {t['epochs']}")
    if cfg["SCHEDULER"]["sched_name"] == "multistep":
        m = s["milestones"]
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < t["epochs"] for x in m) or m != sorted(set(m)):
            raise BsdistError(f"SCHEDULER.params.milestones must be increasing whole epochs between 1 and "
                              f"{t['epochs'] - 1}, got {m}")
    elif s["milestones"]:
        raise BsdistError("SCHEDULER.params.milestones is only used by multistep; remove it or set sched_name multistep")
    if d["imbalance_type"] == "auto":
        d["imbalance_type"] = "exp" if d["name"] in ARRAY_DATASETS else None
        if d["imbalance_type"] is None and d["imbalance_factor"] == FIELDS["DATASET.imbalance_factor"].default:
            d["imbalance_factor"] = 1.0  # the default factor is CIFAR's; a list is used as it is
    if cfg["MODEL"]["stem"] == "auto":  # a 7x7 stride-2 stem and max-pool would leave a 32 px image 8 px wide
        cfg["MODEL"]["stem"] = "cifar" if d["name"] in ARRAY_DATASETS or d["image_size"] <= 64 else "imagenet"
    if "RandomResizedCrop" in d["aug_info"] and d["name"] not in FILE_DATASETS:
        raise BsdistError(f"DATASET.aug_info RandomResizedCrop crops image files as they are decoded; {d['name']} is held in "
                          "memory at its own size: use RandomCrop")
    if d["name"] not in FILE_DATASETS and any(d[k] for k in ("train_list", "val_list", "test_list")):
        raise BsdistError(f"DATASET.train_list, val_list and test_list name image lists; {d['name']} has its own files: "
                          "set DATASET.name ImageList (or a preset) to train from lists")
    if d["imbalance_type"] is None and d["imbalance_factor"] != 1:
        raise BsdistError(f"DATASET.imbalance_type null keeps every training image but imbalance_factor is "
                          f"{d['imbalance_factor']}; set imbalance_type exp or step to draw a long tail, or imbalance_factor 1")
    if len(set(d["aug_info"])) != len(d["aug_info"]):
        raise BsdistError(f"DATASET.aug_info lists an augmentation twice: {d['aug_info']}")
    if device_here:
        check_device(cfg)
    if cfg["DEFAULT"]["exp_name"] is None:
        cfg["DEFAULT"]["exp_name"] = default_exp_name(cfg)
    if any(c in cfg["DEFAULT"]["exp_name"] for c in "/\\") or cfg["DEFAULT"]["exp_name"] in ("", ".", ".."):
        raise BsdistError(f"DEFAULT.exp_name {cfg['DEFAULT']['exp_name']!r} must be a plain directory name")
    return cfg


def check_device(cfg: dict) -> str:
    """The device this process trains on, once the config's device-dependent choices are known to work here."""
    device = resolve_device(cfg["TRAIN"]["device"])
    if device == "cuda" and cfg["TRAIN"]["mixed_precision"] == "bf16":
        import torch
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise BsdistError("TRAIN.mixed_precision bf16 is not supported by this GPU; use fp16")
    return device


def resolve_device(name: str) -> str:
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise BsdistError("TRAIN.device cuda but no CUDA device is visible; set TRAIN.device cpu or auto")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        expected = gpus_expected()
        if expected:
            raise BsdistError(f"this node has GPUs ({expected}) but CUDA cannot use them (torch {torch.__version__}, built for "
                              f"CUDA {torch.version.cuda}): install a torch build that matches the driver, or set TRAIN.device "
                              "cpu to train on the CPU")
        return "cpu"
    return name


def gpus_expected(dev: str = "/dev") -> str | None:
    """Why this process should have GPUs (SLURM allocated some, or NVIDIA device files exist), or None."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = os.environ.get(var, "").strip()
        if value and value != "0":
            return f"{var}={value}"
    try:
        devices = sorted(f for f in os.listdir(dev) if f.startswith("nvidia") and f[6:].isdigit())
    except OSError:
        return None
    return os.path.join(dev, devices[0]) if devices else None


def resolve_precision(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device != "cuda":
        return "no"
    import torch
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"  # emulated bf16 is slow


def resolve_sync_bn(cfg: dict, world_size: int) -> tuple[bool, str]:
    """Whether BatchNorm synchronises across processes, and why (for the log)."""
    setting, local_batch = cfg["MODEL"]["sync_bn"], cfg["DATASET"]["batch_size"] // world_size
    if world_size == 1:
        return False, "one process: its BatchNorm already sees the whole batch"
    if setting != "auto":
        return setting, f"MODEL.sync_bn {str(setting).lower()}"
    if local_batch < cfg["MODEL"]["sync_bn_batch"]:
        return True, (f"{local_batch} images per process is below MODEL.sync_bn_batch {cfg['MODEL']['sync_bn_batch']}: "
                      f"statistics of the global batch of {cfg['DATASET']['batch_size']}, as one process computes them")
    return False, f"{local_batch} images per process (at least MODEL.sync_bn_batch {cfg['MODEL']['sync_bn_batch']})"


def default_exp_name(cfg: dict) -> str:
    """<loss>-<imbalance_type>-IF_<factor>; for a stage 2, <stage-1 run's name>-cRT-<loss>."""
    d, stage1 = cfg["DATASET"], cfg["CRT"]["stage1"]
    if stage1:
        return f"{os.path.basename(os.path.normpath(stage1))}-cRT-{cfg['LOSS']['name']}"
    if d["imbalance_type"] is None and d["name"] in FILE_DATASETS:
        return f"{cfg['LOSS']['name']}-as_listed"
    factor = f"{d['imbalance_factor']:g}"
    return f"{cfg['LOSS']['name']}-{d['imbalance_type'] or 'balanced'}-IF_{factor}"


def run_dir(cfg: dict) -> str:
    return os.path.join(cfg["DEFAULT"]["savedir"], cfg["DATASET"]["name"], cfg["MODEL"]["name"], cfg["DEFAULT"]["exp_name"])


# Keys added since the first release, with the value that reproduces what a config saved before them did.
ADDED_KEYS = {"DATASET.split_seed": lambda saved: saved.get("DEFAULT", {}).get("seed", 0),  # one seed drew the subset too
              "MODEL.stem": lambda saved: "cifar",  # the only stem there was
              "MODEL.sync_bn": lambda saved: False}  # BatchNorm was per process


def upgrade(saved: dict) -> dict:
    """A config.yaml written by an earlier bsdist, with the keys added since set to what that version did:
    ADDED_KEYS where that differs from today's default, the default otherwise (a key's default is chosen
    to keep what runs did before it existed)."""
    if not isinstance(saved, dict):
        return saved
    saved = copy.deepcopy(saved)
    for key, f in FIELDS.items():
        *parents, leaf = key.split(".")
        node = saved
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = ADDED_KEYS[key](saved) if key in ADDED_KEYS else copy.deepcopy(f.default)
    return saved


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two validated configs, ignoring those a resume may change."""
    return [k for k in FIELDS if k not in RESUMABLE_CHANGES and _get_or_missing(old, k) != get(new, k)]


def _get_or_missing(cfg: dict, key: str) -> Any:
    try:
        return get(cfg, key)
    except (KeyError, TypeError):
        return "<missing>"


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def reference_markdown() -> str:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, f in FIELDS.items():
        default = yaml.safe_dump(f.default, default_flow_style=True).strip().removesuffix("...").strip()
        allowed = f" ({', '.join(f.choices)})" if f.choices and f.kind == "choice" else ""
        rows.append(f"| `{key}` | `{default}` | {f.help}{allowed} |")
    return "\n".join(rows)


def default_yaml() -> str:
    return "# Generated by `python -m bsdist.config`: every key with its default.\n" + dump(defaults())


if __name__ == "__main__":
    sys.stdout.write(reference_markdown() + "\n" if "--markdown" in sys.argv else default_yaml())
