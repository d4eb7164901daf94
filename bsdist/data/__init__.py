"""config -> datasets -> loaders: the training shard of this rank and exact evaluation shards."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from bsdist.data.augment import BatchAugment
from bsdist.data.datasets import DATASETS, LongTailDataset, collate_batch
from bsdist.distributed import DistEnv, main_process_first
from bsdist.errors import BsdistError

__all__ = ["DATASETS", "Data", "ShardSampler", "build_data", "check_available"]


class ShardSampler(Sampler):
    """Rank r takes indices r, r + W, r + 2W, ...: every index exactly once over all ranks, no padding."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Data:
    train: DataLoader
    train_sampler: DistributedSampler
    eval: dict  # split name ("val", "test") -> DataLoader over this rank's exact shard
    augment: BatchAugment
    num_per_cls: dict
    num_classes: int
    in_channels: int


def check_available(cfg: dict) -> None:
    d = cfg["DATASET"]
    DATASETS[d["name"]].check_available(d["datadir"], d["download"])


def build_data(cfg: dict, env: DistEnv) -> Data:
    d, seed = cfg["DATASET"], cfg["DEFAULT"]["seed"]
    cls: type[LongTailDataset] = DATASETS[d["name"]]
    with main_process_first(env):  # rank 0 downloads; the others then find the files
        train = cls(d["datadir"], train=True, download=d["download"], imbalance_type=d["imbalance_type"],
                    imbalance_factor=d["imbalance_factor"], seed=seed, val_per_cls=d["val_per_cls"])
        test = cls(d["datadir"], train=False)
    local_batch = d["batch_size"] // env.world_size
    sampler = DistributedSampler(train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < local_batch:
        raise BsdistError(f"the {len(train)} training images give each of {env.world_size} processes {len(sampler)}, fewer than "
                          f"one batch of {local_batch}; lower DATASET.batch_size")
    pin = env.device.type == "cuda"
    workers = d["num_workers"]
    train_loader = DataLoader(train, batch_sampler=BatchSampler(sampler, local_batch, drop_last=True), collate_fn=collate_batch,
                              num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    splits = {"val": train.val, "test": test} if train.val is not None else {"test": test}
    eval_loaders = {
        name: DataLoader(ds, batch_sampler=BatchSampler(ShardSampler(len(ds), env.rank, env.world_size), d["test_batch_size"], drop_last=False),
                         collate_fn=collate_batch, num_workers=0, pin_memory=pin)
        for name, ds in splits.items()
    }
    augment = BatchAugment(len(train), cls.mean, cls.std, d["aug_info"], d["crop_padding"], seed, env.device)
    return Data(train_loader, sampler, eval_loaders, augment, train.num_per_cls, cls.num_classes, train.data.shape[-1])
