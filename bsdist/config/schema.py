"""The field table: every config key, as a field of a frozen dataclass per YAML section, with its
default, type, allowed values, check and help. It is the one source of the keys: the YAML layout,
validation, `configs/default.yaml`, the README's reference and typed access (`cfg.TRAIN.epochs`)
all come from it.

The names of the registries (datasets, augmentations, losses, heads, models) are declared in names.py, so
validation reads no registry and config imports none of data, losses or models; each registry checks at
import that it holds exactly the declared names (check_registry). This module stays free of torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from bsdist.config.names import (  # noqa: F401  (re-exported: the registries import their names from here)
    ARRAY_DATASET_NAMES, AUGMENTATION_NAMES, FILE_DATASET_NAMES, HEAD_NAMES, LOSS_NAMES, MODEL_NAMES, check_registry,
    is_file_list)

KINDS = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}


@dataclass(frozen=True)
class Field:
    default: Any
    kind: str  # int, float, str, bool, list, choice, auto_bool
    help: str
    choices: tuple = ()
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None
    resumable: bool = False  # may differ between a run and its resumption: changes speed or logging, never results


def option(default, help: str, *, kind: str | None = None, choices=(), nullable: bool | None = None,
           check=None, resumable: bool = False):
    """A dataclass field carrying its Field; the kind follows from the default unless given."""
    if kind is None:
        kind = "choice" if choices and not isinstance(default, list) else KINDS[type(default)]
    meta = Field(default, kind, help, choices, default is None if nullable is None else nullable, check, resumable)
    if isinstance(default, list):  # held as a tuple, so the config stays immutable
        return dataclasses.field(default=tuple(default), metadata={"field": meta})
    return dataclasses.field(default=default, metadata={"field": meta})


def section(cls):
    return dataclasses.field(default_factory=cls, metadata={"section": cls})


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def at_least_one(v):
    return None if v >= 1 else "must be >= 1"


def fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class Default:
    seed: int = option(0, "seed of model initialisation, shuffling and augmentation; runs with several seeds share one "
                          "long-tailed subset (DATASET.split_seed)", check=non_negative)
    savedir: str = option("./results", "root of run directories: <savedir>/<dataset>/<model>/<exp_name>")
    exp_name: str | None = option(None, "run name; null derives <loss>-<imbalance_type>-IF_<factor> (a stage 2: "
                                        "<stage-1 run>-cRT-<loss>)", kind="str")


@dataclass(frozen=True)
class Dataset:
    name: str = option("CIFAR10LT", "dataset: CIFAR-LT and the offline digits held in memory; ImageList (split lists "
                                    "or a class-per-folder tree) and its presets ImageNetLT, PlacesLT, iNat2018 read "
                                    "image files", choices=(*ARRAY_DATASET_NAMES, *FILE_DATASET_NAMES))
    datadir: str = option("./data", "directory holding cifar-10-batches-py/ or cifar-100-python/, or the images (and "
                                    "split lists) of an image-list dataset", resumable=True)
    train_list: str | None = option(None, "image-list datasets: the training list (`relative/path label` lines; "
                                          "relative to datadir, or absolute); null takes the preset's, or "
                                          "train/<class>/ folders", kind="str")
    val_list: str | None = option(None, "image-list datasets: the validation list; null takes the preset's, or "
                                        "val/<class>/ folders where they exist", kind="str")
    test_list: str | None = option(None, "image-list datasets: the test list; null takes the preset's, or "
                                         "test/<class>/ folders", kind="str")
    image_size: int = option(224, "image-list datasets: side of the square training and evaluation images "
                                  "(evaluation resizes the shorter side to image_size * 256 / 224 and crops the "
                                  "centre)", check=positive)
    max_image_pixels: int = option(89_478_485, "image-list datasets: the most pixels an image's header may claim "
                                               "(PIL's limit); a larger one stops the run before it is decoded. "
                                               "JPEG files above 4096 x 4096 are decoded reduced in the DCT (1/2, "
                                               "1/4 or 1/8) to the smallest size that covers their crop",
                                   check=positive, resumable=True)  # a run that stopped at a large image resumes
    download: bool = option(False, "download CIFAR (md5-checked) into datadir when missing", resumable=True)
    batch_size: int = option(32, "global images per step, split evenly across processes", check=positive)
    test_batch_size: int = option(1024, "images per evaluation batch on each process", check=positive, resumable=True)
    loader: str = option("auto", "device: batches are made on the training device (CIFAR and digits: the uint8 "
                                 "dataset lives there; image files: DataLoader workers read the bytes, the device "
                                 "decodes the JPEGs, nvJPEG on CUDA); dataloader: DataLoader workers decode and feed "
                                 "batches from host memory; auto: device when an in-memory dataset fits, dataloader "
                                 "for image files", choices=("auto", "device", "dataloader"), resumable=True)
    sampler: str = option("instance", "training order: instance draws every image once per epoch "
                                      "(DistributedSampler); class_balanced draws classes equally often (each image "
                                      "of a class equally likely), the epoch keeping its number of images: cRT's "
                                      "sampler", choices=("instance", "class_balanced"))
    num_workers: int = option(2, "DataLoader worker processes per training process (loader dataloader, and image "
                                 "files)", check=non_negative, resumable=True)
    imbalance_type: str | None = option("auto", "long-tail profile drawn from the training images; null keeps them "
                                                "all (a balanced set stays balanced, a list as it is); auto is exp "
                                                "for CIFAR and digits and null for image lists",
                                        choices=("auto", "exp", "step"), nullable=True)
    split_seed: int = option(0, "seed of the long-tailed subset and the validation hold-out; 0 is the standard "
                                "subset of LDAM-DRW and the reference trainer", check=non_negative)
    imbalance_factor: float = option(100.0, "largest / smallest class count (1 = balanced)", check=at_least_one)
    val_per_cls: int = option(0, "balanced validation images per class, taken from training images the long-tailed "
                                 "subset left unused; 0 selects the best model on the test set", check=non_negative)
    aug_info: tuple[str, ...] = option(["RandomCrop", "RandomHorizontalFlip"], "training augmentations, applied per "
                                       "batch on the device (RandomResizedCrop: as image files are decoded)",
                                       choices=AUGMENTATION_NAMES)
    crop_padding: int = option(4, "zero padding of RandomCrop, in pixels", check=non_negative)


@dataclass(frozen=True)
class Loss:
    name: str = option("BalancedSoftmax", "training loss", choices=LOSS_NAMES)
    tau: float = option(1.0, "LogitAdjustedLoss: trains on logits + tau * log(class prior) (Menon et al. 2021); 1 is "
                             "Balanced Softmax, 0 cross-entropy", check=non_negative)
    max_margin: float = option(0.5, "LDAMLoss: the largest class margin (the rarest class's), margins going as "
                                    "n_c^(-1/4) (Cao et al. 2019)", check=positive)
    scale: float = option(30.0, "LDAMLoss: the logits' scale s (cosine logits lie in [-1, 1])", check=positive)
    drw_epoch: int | None = option(160, "LDAMLoss: deferred re-weighting: from this epoch on (counted from 0) the "
                                        "loss weights classes by their class-balanced weight (LOSS.beta); null "
                                        "never re-weights", kind="int", nullable=True,
                                  check=non_negative)
    beta: float = option(0.9999, "ClassBalancedLoss and LDAMLoss's re-weighting: class weights (1 - beta) / (1 - "
                                 "beta^n_c), summing to the number of classes (Cui et al. 2019); 0 weights every "
                                 "class 1", check=fraction)
    gamma: float = option(1.0, "FocalLoss and ClassBalancedLoss focal: the focal exponent, (1 - p_t)^gamma (Lin et "
                               "al. 2017); 0 is cross-entropy", check=non_negative)
    cb_loss_type: str = option("softmax", "ClassBalancedLoss: the weighted loss, softmax cross-entropy, sigmoid "
                                          "(binary) cross-entropy or sigmoid focal", choices=("softmax", "sigmoid",
                                                                                              "focal"))


@dataclass(frozen=True)
class Optimizer:
    name: str = option("SGD", "optimiser", choices=("SGD",))
    lr: float = option(0.1, "peak learning rate", check=positive)
    momentum: float = option(0.0, "SGD momentum", check=fraction)
    weight_decay: float = option(0.0, "L2 weight decay", check=non_negative)
    nesterov: bool = option(False, "Nesterov momentum (needs momentum > 0)")


@dataclass(frozen=True)
class SchedulerParams:
    t_initial: float | None = option(None, "epochs in the first cosine cycle; null means all epochs after warmup",
                                     kind="float", check=positive)
    t_mult: float = option(1.0, "growth of each cosine cycle (warm restarts)", check=at_least_one)
    eta_min: float = option(1e-5, "lowest learning rate of the cosine schedule", check=non_negative)
    milestones: tuple[int, ...] = option([], "epochs at which multistep multiplies the learning rate by gamma")
    gamma: float = option(0.1, "multistep factor", check=positive)
    warmup_epochs: float = option(0.0, "linear warmup from 0 to lr over this many epochs", check=non_negative)


@dataclass(frozen=True)
class Scheduler:
    sched_name: str = option("cosine_annealing", "learning-rate schedule, stepped every optimiser step",
                             choices=("cosine_annealing", "multistep"))
    params: SchedulerParams = section(SchedulerParams)


@dataclass(frozen=True)
class Train:
    epochs: int = option(50, "training epochs", check=at_least_one)
    grad_accum_steps: int = option(1, "micro-batches per optimiser step (DDP no_sync on the inner ones)",
                                   check=at_least_one)
    mixed_precision: str = option("auto", "autocast dtype; fp16 adds a gradient scaler; auto is bf16 on CUDA (fp16 "
                                          "where the GPU lacks bf16) and no on CPU, where bf16 is emulated and slow",
                                  choices=("auto", "fp16", "bf16", "no"))
    log_interval: int = option(10, "optimiser steps between console lines", check=at_least_one, resumable=True)
    ckp_metric: str = option("bcr", "metric choosing best.pt (lower is better for loss)",
                             choices=("bcr", "acc", "loss"))
    compile: bool | str = option("auto", "torch.compile the model; auto compiles on CUDA only", kind="auto_bool",
                                 resumable=True)
    ddp_bucket_mb: float = option(25.0, "size of DDP's gradient all-reduce buckets in MB (ResNet-18's gradients are "
                                        "45 MB in fp32); at least DDP's 1 MB first bucket, which torch.compile's "
                                        "split at the buckets requires", check=at_least_one, resumable=True)
    device: str = option("auto", "training device; auto picks cuda when available, and refuses to train on the CPU "
                                 "of a node whose GPUs CUDA cannot see", choices=("auto", "cuda", "cpu"),
                         resumable=True)  # a GPU run may continue on CPU, and back
    dist_backend: str = option("auto", "collectives: auto is NCCL for CUDA tensors (gloo for host objects) and gloo "
                                       "on CPU; gloo on CUDA is slow but lets several processes share one GPU",
                               choices=("auto", "gloo"), resumable=True)
    ckpt_every_steps: int = option(0, "also write last.pt every this many optimiser steps inside an epoch (0: at "
                                      "epoch ends only); a resume continues from that exact step",
                                   check=non_negative, resumable=True)
    check_every_steps: int = option(20, "optimiser steps between the host's reads of what the processes agree on "
                                         "(stop signals, non-finite losses), besides every log point and "
                                         "checkpoint; the step itself never waits for the device, so a signal or a "
                                         "non-finite loss is acted on up to this many steps later",
                                    check=at_least_one, resumable=True)
    nonfinite: str = option("stop", "on a non-finite loss (seen by all ranks at the same step): stop, keeping the "
                                    "last good checkpoint, or skip the step (no weight, momentum or BatchNorm "
                                    "statistic changes)", choices=("stop", "skip"),
                            resumable=True)
    resume: bool | str = option(False, "auto continues the run in the run directory from last.pt, or starts it; true "
                                       "must continue one; false refuses a directory that holds a run (a checkpoint "
                                       "or results)", kind="auto_bool", resumable=True)
    dist_timeout_s: int = option(600, "timeout of every collective after the first epoch, in seconds: a peer that "
                                      "dies or hangs stops the others within it", check=positive, resumable=True)
    dist_startup_timeout_s: int = option(1800, "the collectives' timeout from start-up through the first epoch "
                                               "(data download, compilation), in seconds; joining the process "
                                               "group itself may take at most 300 s of it", check=positive,
                                         resumable=True)


@dataclass(frozen=True)
class Crt:
    stage1: str | None = option(None, "decoupled stage 2 (classifier re-training, cRT): the run directory of a "
                                      "finished stage-1 run whose selected model (best.pt) this run loads and "
                                      "freezes (BatchNorm included), training only a re-initialised classifier; "
                                      "null: a run of its own", kind="str")


@dataclass(frozen=True)
class Model:
    name: str = option("resnet18", "model: resnet32 is the CIFAR ResNet of LDAM-DRW and BALMS, the others are "
                                   "torchvision's with MODEL.stem (see bsdist.models.zoo)",
                       choices=MODEL_NAMES)
    stem: str = option("auto", "first layers: cifar (3x3 stride-1 convolution, no max-pool) or imagenet (7x7 stride-2 "
                               "and max-pool); auto is cifar up to 64 px images (CIFAR, digits, image lists at "
                               "DATASET.image_size <= 64) and imagenet above", choices=("auto", "cifar", "imagenet"))
    pretrained: str | None = option(None, "a local weights file (a state dict, or a checkpoint holding one) to start "
                                          "from, read with weights_only; the classifier starts afresh when its class "
                                          "count differs; nothing is downloaded", kind="str")
    classifier: str = option("linear", "the classifier fc: linear, or cosine (NormedLinear of LDAM-DRW: the cosine "
                                       "of the normalised features and class weights, no bias; what LDAMLoss trains "
                                       "on in its source); post-hoc methods and cRT need linear",
                             choices=("linear", *HEAD_NAMES))
    sync_bn: bool | str = option("auto", "BatchNorm statistics over the global batch (all processes' images), as one "
                                         "process with the same batch computes them; auto: when several processes "
                                         "each hold fewer than MODEL.sync_bn_batch images", kind="auto_bool")
    sync_bn_batch: int = option(32, "with MODEL.sync_bn auto, the per-process batch below which BatchNorm "
                                    "synchronises", check=positive)


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
