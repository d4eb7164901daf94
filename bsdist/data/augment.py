"""Batch augmentation on the training device: random crop with zero padding, horizontal flip,
uint8 -> float, normalisation, channels_last. One gather does crop and flip for the whole batch.

The random draws come from a per-epoch table indexed by each image's dataset index and seeded by
(seed, epoch), so an image is augmented the same way whatever the world size or batch split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, epoch, stream): independent streams, reproducible anywhere."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class BatchAugment:
    def __init__(self, num_samples: int, *, mean, std, aug_info, padding: int, seed: int, device):
        self.num_samples, self.padding, self.seed = num_samples, padding, seed
        self.crop = "RandomCrop" in aug_info
        self.flip = "RandomHorizontalFlip" in aug_info
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 1, 1, -1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 1, 1, -1) * 255
        self.table = None
        self._ranges_for, self._cached = None, None

    def set_epoch(self, epoch: int) -> None:
        g = epoch_generator(self.seed, epoch, stream=1)
        offsets = torch.randint(0, 2 * self.padding + 1, (self.num_samples, 2), generator=g)
        if not self.crop:
            offsets.fill_(self.padding)
        flips = torch.randint(0, 2, (self.num_samples, 1), generator=g) * int(self.flip)
        self.table = torch.cat([offsets, flips], 1).to(self.device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C -> normalised float N x C x H x W in channels_last memory."""
        x = (images.float() - self.mean) / self.std
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            raise RuntimeError("BatchAugment.set_epoch must be called before the first batch of an epoch")
        n, h, w, _ = images.shape
        p = self.padding
        dy, dx, flip = self.table[indices.to(self.device)].unbind(1)
        padded = F.pad(images, (0, 0, p, p, p, p))
        rows_, cols_, batch = self._ranges(n, h, w)
        rows = dy[:, None] + rows_
        cols = dx[:, None] + torch.where(flip[:, None].bool(), w - 1 - cols_, cols_)
        return self.normalize(padded[batch, rows[:, :, None], cols[:, None, :]])

    def _ranges(self, n: int, h: int, w: int):
        """The index ranges of a batch shape, made once (every training batch has the same shape)."""
        if self._ranges_for != (n, h, w):
            self._ranges_for = (n, h, w)
            self._cached = (torch.arange(h, device=self.device), torch.arange(w, device=self.device).expand(n, w),
                            torch.arange(n, device=self.device)[:, None, None])
        return self._cached
