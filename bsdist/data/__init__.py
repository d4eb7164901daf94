"""config -> datasets -> loaders: the training shard of this rank and exact evaluation shards (build),
in the orders of samplers, gathered by loaders."""

from bsdist.data.build import DATASETS, Data, Splits, build_data, check_available, is_file_list, load_splits, prepare
from bsdist.data.datasets import CIFAR10LT, CIFAR100LT, DigitsLT
from bsdist.data.loaders import DeviceLoader, worker_loader
from bsdist.data.samplers import ClassBalancedSampler, ResumableBatchSampler, ShardSampler

__all__ = ["CIFAR10LT", "CIFAR100LT", "ClassBalancedSampler", "DATASETS", "Data", "DigitsLT",
           "DeviceLoader", "ResumableBatchSampler", "ShardSampler", "Splits", "build_data", "check_available",
           "is_file_list", "load_splits", "prepare", "worker_loader"]
