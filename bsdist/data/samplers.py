"""The orders in which ranks read a dataset: exact evaluation shards, class-balanced training draws, and
batches that can begin mid-epoch for an exact resume."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


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
