"""config -> datasets -> loaders: the training shard of this rank and exact evaluation shards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bsdist.config.schema import is_file_list
from bsdist.data import device_decoding, imagefiles, imagelist
from bsdist.data.augment import BatchAugment
from bsdist.data.datasets import ARRAY_DATASETS, LongTailDataset
from bsdist.data.imagefiles import DecodeOnDevice
from bsdist.data.loaders import DeviceLoader, fits_on_device, worker_loader
from bsdist.data.samplers import ClassBalancedSampler, ResumableBatchSampler, ShardSampler
from bsdist.distributed import DistEnv, main_process_first
from bsdist.errors import BsdistError

if TYPE_CHECKING:
    from bsdist.config import Config

# The DATASET.name registry: datasets held in memory as one uint8 array, then those that read image files.
DATASETS = (*ARRAY_DATASETS, *imagelist.FILE_DATASETS)


@dataclass(kw_only=True)
class Data:
    train: DeviceLoader | DataLoader | DecodeOnDevice
    train_sampler: DistributedSampler
    eval: dict  # split name ("val", "test") -> loader over this rank's exact shard
    augment: BatchAugment
    num_per_cls: dict
    num_classes: int
    in_channels: int
    class_names: list[str] | None = None  # None: the class indices


def check_available(cfg: Config, download: bool | None = None) -> None:
    """The dataset's files are there (or will be downloaded: DATASET.download, unless `download` says)."""
    dataset = cfg.DATASET
    if is_file_list(dataset.name):
        if not os.path.isdir(dataset.datadir):
            raise BsdistError(f"DATASET.datadir {dataset.datadir} is not a directory; set it to the folder that holds "
                              f"the images (and the split lists) of {dataset.name}")
        return
    ARRAY_DATASETS[dataset.name].check_available(dataset.datadir, dataset.download if download is None else download)


def prepare(cfg: Config) -> None:
    """The data on disk now: downloaded once if missing and allowed, else one clear error (for a sweep,
    before its first run, rather than every run failing on its own)."""
    dataset = cfg.DATASET
    if dataset.download and not is_file_list(dataset.name):
        ARRAY_DATASETS[dataset.name].download(dataset.datadir)
    check_available(cfg, download=False)


@dataclass(kw_only=True)
class Splits:
    """A dataset config's images: the long-tailed training split and the evaluation splits."""
    train: torch.utils.data.Dataset
    eval: dict  # "val" (where there is one), "test"
    num_classes: int
    class_names: list[str] | None
    mean: tuple
    std: tuple
    in_channels: int
    files: bool  # decoded from files as loaded (else held in memory as one uint8 array)


def load_splits(cfg: Config, encoded: bool | None = None) -> Splits:
    """The splits; image files read for decoding on the device where `encoded` (default: DATASET.loader device)."""
    dataset = cfg.DATASET
    if is_file_list(dataset.name):
        encoded = dataset.loader == "device" if encoded is None else encoded
        train, splits, num_classes, names = imagelist.load_splits(dataset, cfg.DEFAULT.seed, encoded=encoded)
        return Splits(train=train, eval=splits, num_classes=num_classes, class_names=names,
                      mean=imagefiles.IMAGENET_MEAN, std=imagefiles.IMAGENET_STD, in_channels=3, files=True)
    cls: type[LongTailDataset] = ARRAY_DATASETS[dataset.name]
    train = cls(dataset.datadir, train=True, download=dataset.download, imbalance_type=dataset.imbalance_type,
                imbalance_factor=dataset.imbalance_factor, seed=dataset.split_seed, val_per_cls=dataset.val_per_cls)
    test = cls(dataset.datadir, train=False)
    splits = {"val": train.val, "test": test} if train.val is not None else {"test": test}
    return Splits(train=train, eval=splits, num_classes=cls.num_classes, class_names=train.class_names, mean=cls.mean,
                  std=cls.std, in_channels=train.data.shape[-1], files=False)


def build_data(cfg: Config, env: DistEnv) -> Data:
    dataset, seed = cfg.DATASET, cfg.DEFAULT.seed
    decode_on_device = (dataset.loader == "device" and is_file_list(dataset.name)
                        and device_decoding.device_decoder_works(env.device))
    with main_process_first(env):  # rank 0 downloads, then one process per node; the others then find the files
        loaded = load_splits(cfg, encoded=decode_on_device)
    train, splits = loaded.train, loaded.eval
    num_per_cls = {c: int(n) for c, n in enumerate(np.bincount(train.targets, minlength=loaded.num_classes))}
    local_batch = dataset.batch_size // env.world_size
    if dataset.sampler == "class_balanced":
        sampler = ClassBalancedSampler(train, env.world_size, env.rank, seed)
    else:
        sampler = DistributedSampler(train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                     drop_last=True)
    if len(sampler) < local_batch:
        raise BsdistError(f"the {len(train)} training images give each of {env.world_size} processes {len(sampler)}, "
                          f"fewer than one batch of {local_batch}; lower DATASET.batch_size")
    eval_samplers = {name: ShardSampler(len(ds), env.rank, env.world_size) for name, ds in splits.items()}
    on_device = not loaded.files and (dataset.loader == "device" or (
        dataset.loader == "auto" and fits_on_device([train, *splits.values()], env.device)))

    def loader(split, sampler, batch_size: int, drop_last: bool, workers: int):
        if loaded.files:
            sampler = imagefiles.KeyedSampler(sampler, len(split))  # a training crop depends on the epoch
        batches = ResumableBatchSampler(sampler, batch_size, drop_last)
        if on_device:
            return DeviceLoader(split, batches, env.device)
        workers_loader = worker_loader(split, batches, workers, env.device, prefetch=4 if loaded.files else None)
        return DecodeOnDevice(workers_loader, env.device) if decode_on_device else workers_loader

    train_loader = loader(train, sampler, local_batch, True, dataset.num_workers)
    eval_workers = dataset.num_workers if loaded.files else 0  # decoding files is work; slicing an array is not
    eval_loaders = {name: loader(ds, eval_samplers[name], dataset.test_batch_size, False, eval_workers)
                    for name, ds in splits.items()}
    augment = BatchAugment(len(train), mean=loaded.mean, std=loaded.std, aug_info=dataset.aug_info,
                           padding=dataset.crop_padding, seed=seed, device=env.device)
    return Data(train=train_loader, train_sampler=sampler, eval=eval_loaders, augment=augment, num_per_cls=num_per_cls,
                num_classes=loaded.num_classes, in_channels=loaded.in_channels, class_names=loaded.class_names)
