"""What a training loss is to the Trainer, so that adding one is its module, its line in LOSSES and its tests."""

from __future__ import annotations

import torch
from torch import nn

from bsdist.errors import BsdistError
from bsdist.method import MethodContext


class Loss(nn.Module):
    """A training loss: built once as cls(settings, context), settings being the config's LOSS section and
    context the run's MethodContext (class counts, prior, head, epoch, step), then called per micro-batch
    as loss(logits, targets) -> the micro-batch's mean loss.

    logits come in the forward pass's precision (a loss computes in float32); targets are class indices
    (N,) or class probabilities (N, C), as a mixing augmentation (mixup) makes them.
    """

    def __init__(self, settings, context: MethodContext):
        super().__init__()
        self.context = context

    def positive_counts(self) -> torch.Tensor:
        """The context's log prior, once every class is known to have training images (a loss that adds it to
        the logits would otherwise make a class impossible)."""
        if any(n <= 0 for n in self.context.num_per_cls):
            raise BsdistError(f"{type(self).__name__} needs a positive count for every class, got "
                              f"{self.context.num_per_cls}")
        return self.context.log_prior

    def class_indices(self, target: torch.Tensor) -> torch.Tensor:
        """target, once known to be class indices: for a loss whose source defines no form for class
        probabilities (a shape check, no device read)."""
        if target.dim() != 1:
            raise BsdistError(f"{type(self).__name__} takes class indices as targets, not class probabilities "
                              f"(shape {tuple(target.shape)}): its source defines no soft-target form; train it "
                              "without a mixing augmentation, or use a loss that takes them (CrossEntropyLoss, "
                              "BalancedSoftmax, LogitAdjustedLoss)")
        return target
