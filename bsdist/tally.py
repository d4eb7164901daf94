"""What the training step counts, kept on the device until a sync point reads it: the loss, images,
correct predictions and gradient norm of the finite steps, and the non-finite steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bsdist.distributed import all_reduce_max, all_reduce_sum


@dataclass
class EpochProgress:
    """Where a checkpoint taken inside an epoch stands: optimiser steps done, the loss and the correct
    predictions so far."""
    step: int = 0
    loss_sum: float = 0.0
    images: float = 0.0
    correct: float = 0.0


class DeviceTally:
    """What the host learns only at sync points, kept on the device meanwhile.

    Per optimiser step: the loss sum, image count and correct predictions (argmax of the logits, the
    ones used for prediction) of the step's micro-batches, the gradient norm, and whether any
    rank's loss was non-finite (one 1-element all-reduce, so every rank skips the same steps on the
    device). `flags` go into the sync point's one all-reduce; per log point one more for the loss sums.
    """

    def __init__(self, device: torch.device, progress: EpochProgress):
        f64 = dict(dtype=torch.float64, device=device)
        self.group = torch.zeros(3, **f64)  # loss sum, images, correct of the optimiser step being accumulated
        # the same for finite steps since the last log point, this rank, with their gradient norms and count
        self.pending = torch.zeros(5, **f64)
        self.epoch = torch.tensor([progress.loss_sum, progress.images, progress.correct], **f64)  # all ranks, logged
        # non-finite steps since the last sync point, the first of them
        self.flags = torch.tensor([0.0, math.inf], **f64)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """A micro-batch's mean loss; targets are class indices, or class probabilities (mixup), whose
        largest one counts as the class."""
        self.group[0] += loss.detach().double() * len(targets)
        self.group[1] += len(targets)
        labels = targets if targets.ndim == 1 else targets.argmax(1)
        self.group[2] += (logits.detach().argmax(1) == labels).sum()

    def end_step(self, global_step: int, grad_norm: torch.Tensor) -> torch.Tensor:
        """Close the optimiser step whose (all-reduced) gradients have grad_norm; return its skip flag
        (float32 0/1, the same on every rank)."""
        skip = all_reduce_max((~torch.isfinite(self.group[:1])).float())
        norm = torch.stack([grad_norm.double(), torch.ones_like(grad_norm, dtype=torch.float64)])
        self.pending[:3] += self.group.where(skip == 0, 0.0)
        self.pending[3:] += norm.where((skip == 0) & torch.isfinite(grad_norm), 0.0)  # fp16's scaler may skip too
        self.flags[0] += skip[0]
        torch.minimum(self.flags[1:2], torch.full_like(self.flags[1:2], global_step).where(skip > 0, math.inf),
                      out=self.flags[1:2])
        self.group.zero_()
        return skip

    def clear_flags(self) -> None:
        """After a sync point read the flags: count afresh."""
        self.flags[0].zero_()
        self.flags[1].fill_(math.inf)

    def read_loss(self) -> tuple[float, float, float, float]:
        """Mean loss, accuracy, images and gradient norm over all ranks since the last call; adds the first
        three to the epoch's totals. (Every rank holds the same norms, so their sum over ranks divided by
        the steps summed over ranks is the mean.)"""
        all_reduce_sum(self.pending)
        loss_sum, images, correct, norm_sum, steps = self.pending.tolist()
        self.epoch += self.pending[:3]
        self.pending.zero_()
        return loss_sum / max(images, 1), correct / max(images, 1), images, norm_sum / steps if steps else math.nan

    def progress(self, step_in_epoch: int) -> EpochProgress:
        """The epoch's position for a checkpoint (the sums as the last read_loss left them)."""
        return EpochProgress(step_in_epoch, *self.epoch.tolist())

    def epoch_means(self) -> tuple[float, float]:
        """The epoch's mean loss and accuracy over all ranks' images."""
        loss_sum, images, correct = self.epoch.tolist()
        return loss_sum / max(images, 1), correct / max(images, 1)
