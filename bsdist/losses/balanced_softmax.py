"""Balanced Softmax (Ren et al., NeurIPS 2020).

Balanced Softmax trains on logits + log(n_c): the softmax then models the long-tailed training
distribution while the raw logits, used for prediction, model the balanced one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdist.losses.base import Loss


class BalancedSoftmax(Loss):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.log_prior = self.positive_counts()

    def forward(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """reduction "mean", "sum" or "none" (per image), as the official implementation takes it."""
        return F.cross_entropy(logits.float() + self.log_prior, target, reduction=reduction)
