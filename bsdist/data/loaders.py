"""Where a batch is gathered: from a uint8 dataset held on the training device (DeviceLoader), or by
DataLoader workers from host memory (worker_loader)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from bsdist.data.datasets import collate_batch
from bsdist.data.samplers import ResumableBatchSampler


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


def worker_loader(dataset, batches: ResumableBatchSampler, workers: int, device: torch.device,
                  prefetch: int | None = None) -> DataLoader:
    """A DataLoader of a dataset's uint8 batches made by `workers` processes (persistent), pinned for CUDA."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_batch, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers > 0 else None)
