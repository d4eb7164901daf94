"""config -> datasets -> loaders: the training shard of this rank and exact evaluation shards."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from bsdist.data import imagefiles, imagelist
from bsdist.data.augment import AUGMENTATIONS, BatchAugment
from bsdist.data.datasets import ARRAY_DATASETS, CIFAR10LT, CIFAR100LT, DigitsLT, LongTailDataset, collate_batch
from bsdist.data.imagefiles import DecodeOnDevice
from bsdist.distributed import DistEnv, main_process_first
from bsdist.errors import BsdistError

if TYPE_CHECKING:  # config reads this package's registry as it validates: at run time the import goes one way
    from bsdist.config import Config

# The DATASET.name registry: datasets held in memory as one uint8 array, then those that read image files.
DATASETS = (*ARRAY_DATASETS, *imagelist.FILE_DATASETS)

__all__ = ["AUGMENTATIONS", "CIFAR10LT", "CIFAR100LT", "ClassBalancedSampler", "DATASETS", "Data", "DigitsLT",
           "DeviceLoader", "ResumableBatchSampler", "ShardSampler", "Splits", "build_data", "check_available",
           "is_file_list", "load_splits", "prepare"]


class ShardSampler(Sampler):
    """Rank r takes indices r, r + W, r + 2W, ...: every index exactly once over all ranks, no padding."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ClassBalancedSampler(DistributedSampler):
    """Class-balanced sampling for every world size: each epoch draws as many images as the dataset
    holds, every class equally often (to within one: the remainder's classes are drawn at random) and
    each image of a class equally likely, with replacement (the sampler of cRT, Kang et al. 2020).

    The epoch's global order depends only on (seed, epoch); rank r takes positions r, r + W, ... of
    its first W * floor(N / W) entries, as DistributedSampler with drop_last does, so shards are
    disjoint and together they are the order one process would follow. An image drawn twice in an
    epoch is augmented alike (BatchAugment keys its draws by image and epoch).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        targets = torch.as_tensor(dataset.targets)
        self.by_class = torch.argsort(targets, stable=True)  # image indices grouped by class
        counts = torch.bincount(targets)
        self.present = torch.nonzero(counts).flatten()  # classes with images
        self.counts, self.starts = counts, torch.cumsum(counts, 0) - counts

    def global_order(self) -> torch.Tensor:
        """This epoch's draws over all ranks: len(dataset) image indices."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, k = len(self.dataset), len(self.present)
        classes = torch.cat([self.present.repeat(n // k), self.present[torch.randperm(k, generator=g)[:n % k]]])
        classes = classes[torch.randperm(n, generator=g)]
        within = (torch.rand(n, generator=g, dtype=torch.float64) * self.counts[classes]).long()
        return self.by_class[self.starts[classes] + within]

    def __iter__(self):
        return iter(self.global_order()[:self.total_size][self.rank::self.num_replicas].tolist())


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler whose next epoch can begin at batch `start`, to resume mid-epoch exactly."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


class DeviceLoader:
    """Batches gathered from a dataset held on the training device as one uint8 tensor.

    It iterates the same batch sampler a DataLoader would (DistributedSampler for training,
    ShardSampler for evaluation), so both paths see identical batches; only where they are gathered
    differs. Yields (uint8 images N x H x W x C, int64 targets, int64 dataset indices) on the device.
    """

    def __init__(self, dataset, batch_sampler: ResumableBatchSampler, device: torch.device):
        self.dataset, self.batch_sampler, self.device = dataset, batch_sampler, device
        self.images = torch.from_numpy(dataset.data).to(device)
        self.targets = torch.from_numpy(dataset.targets).to(device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        """The epoch's indices reach the device in one copy; each batch is then a slice of them."""
        batches = list(self.batch_sampler)
        flat = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        start = 0
        for batch in batches:
            indices = flat[start:start + len(batch)]
            start += len(batch)
            yield self.images[indices], self.targets[indices], indices


def fits_on_device(datasets, device: torch.device) -> bool:
    """Whether the uint8 images fit comfortably: host memory already holds them; a GPU needs 4x headroom."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 4 * sum(ds.data.nbytes for ds in datasets) < free


@dataclass
class Data:
    train: DeviceLoader | DataLoader | DecodeOnDevice
    train_sampler: DistributedSampler
    eval: dict  # split name ("val", "test") -> loader over this rank's exact shard
    augment: BatchAugment
    num_per_cls: dict
    num_classes: int
    in_channels: int
    class_names: list[str] | None = None  # None: the class indices


def is_file_list(name: str) -> bool:
    """Whether DATASET.name reads image files through lists or folders (decoded as loaded)."""
    return name in imagelist.FILE_DATASETS


def check_available(cfg: Config, download: bool | None = None) -> None:
    """The dataset's files are there (or will be downloaded: DATASET.download, unless `download` says)."""
    d = cfg.DATASET
    if is_file_list(d.name):
        if not os.path.isdir(d.datadir):
            raise BsdistError(f"DATASET.datadir {d.datadir} is not a directory; set it to the folder that holds the "
                              f"images (and the split lists) of {d.name}")
        return
    ARRAY_DATASETS[d.name].check_available(d.datadir, d.download if download is None else download)


def prepare(cfg: Config) -> None:
    """The data on disk now: downloaded once if missing and allowed, else one clear error (for a sweep,
    before its first run, rather than every run failing on its own)."""
    d = cfg.DATASET
    if d.download and not is_file_list(d.name):
        ARRAY_DATASETS[d.name].download(d.datadir)
    check_available(cfg, download=False)


@dataclass
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
    d = cfg.DATASET
    if is_file_list(d.name):
        encoded = d.loader == "device" if encoded is None else encoded
        train, splits, num_classes, names = imagelist.load_splits(d, cfg.DEFAULT.seed, encoded=encoded)
        return Splits(train, splits, num_classes, names, imagefiles.IMAGENET_MEAN, imagefiles.IMAGENET_STD, 3, True)
    cls: type[LongTailDataset] = ARRAY_DATASETS[d.name]
    train = cls(d.datadir, train=True, download=d.download, imbalance_type=d.imbalance_type,
                imbalance_factor=d.imbalance_factor, seed=d.split_seed, val_per_cls=d.val_per_cls)
    test = cls(d.datadir, train=False)
    splits = {"val": train.val, "test": test} if train.val is not None else {"test": test}
    return Splits(train, splits, cls.num_classes, train.class_names, cls.mean, cls.std, train.data.shape[-1], False)


def worker_loader(dataset, batches: ResumableBatchSampler, workers: int, device: torch.device,
                  prefetch: int | None = None) -> DataLoader:
    """A DataLoader of a dataset's uint8 batches made by `workers` processes (persistent), pinned for CUDA."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_batch, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers > 0 else None)


def build_data(cfg: Config, env: DistEnv) -> Data:
    d, seed = cfg.DATASET, cfg.DEFAULT.seed
    decode_on_device = d.loader == "device" and is_file_list(d.name) and imagefiles.device_decoder_works(env.device)
    with main_process_first(env):  # rank 0 downloads, then one process per node; the others then find the files
        loaded = load_splits(cfg, encoded=decode_on_device)
    train, splits = loaded.train, loaded.eval
    num_per_cls = {c: int(n) for c, n in enumerate(np.bincount(train.targets, minlength=loaded.num_classes))}
    local_batch = d.batch_size // env.world_size
    if d.sampler == "class_balanced":
        sampler = ClassBalancedSampler(train, env.world_size, env.rank, seed)
    else:
        sampler = DistributedSampler(train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                     drop_last=True)
    if len(sampler) < local_batch:
        raise BsdistError(f"the {len(train)} training images give each of {env.world_size} processes {len(sampler)}, "
                          f"fewer than one batch of {local_batch}; lower DATASET.batch_size")
    eval_samplers = {name: ShardSampler(len(ds), env.rank, env.world_size) for name, ds in splits.items()}
    on_device = not loaded.files and (d.loader == "device" or
                                      (d.loader == "auto" and fits_on_device([train, *splits.values()], env.device)))

    def loader(dataset, sampler, batch_size: int, drop_last: bool, workers: int):
        if loaded.files:
            sampler = imagefiles.KeyedSampler(sampler, len(dataset))  # a training crop depends on the epoch
        batches = ResumableBatchSampler(sampler, batch_size, drop_last)
        if on_device:
            return DeviceLoader(dataset, batches, env.device)
        workers_loader = worker_loader(dataset, batches, workers, env.device, prefetch=4 if loaded.files else None)
        return DecodeOnDevice(workers_loader, env.device) if decode_on_device else workers_loader

    train_loader = loader(train, sampler, local_batch, True, d.num_workers)
    eval_workers = d.num_workers if loaded.files else 0  # decoding files is work; slicing an array is not
    eval_loaders = {name: loader(ds, eval_samplers[name], d.test_batch_size, False, eval_workers)
                    for name, ds in splits.items()}
    augment = BatchAugment(len(train), loaded.mean, loaded.std, d.aug_info, d.crop_padding, seed, env.device)
    return Data(train_loader, sampler, eval_loaders, augment, num_per_cls, loaded.num_classes, loaded.in_channels,
                loaded.class_names)
