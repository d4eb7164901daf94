"""Cross-entropy, the baseline every long-tailed method is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdist.losses.base import Loss


class CrossEntropyLoss(Loss):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target)
