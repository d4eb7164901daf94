"""Cross-entropy and Balanced Softmax (Ren et al., NeurIPS 2020), and the class prior they share.

Balanced Softmax trains on logits + log(n_c): the softmax then models the long-tailed training
distribution while the raw logits, used for prediction, model the balanced one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bsdist.config.schema import LOSS_NAMES, check_registry
from bsdist.distributed import DistEnv, all_reduce_max, broadcast_from_main
from bsdist.errors import BsdistError


class BalancedSoftmax(nn.Module):
    def __init__(self, num_per_cls):
        super().__init__()
        counts = torch.as_tensor(num_per_cls, dtype=torch.float64)
        if counts.ndim != 1 or (counts <= 0).any():
            raise BsdistError(f"BalancedSoftmax needs a positive count for every class, got {counts.tolist()}")
        self.register_buffer("log_prior", counts.log().float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """reduction "mean", "sum" or "none" (per image), as the official implementation takes it."""
        return F.cross_entropy(logits.float() + self.log_prior, target, reduction=reduction)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    def __init__(self, num_per_cls=None):
        super().__init__()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), target)


LOSSES = {"CrossEntropyLoss": CrossEntropyLoss, "BalancedSoftmax": BalancedSoftmax}  # LOSS.name
check_registry("bsdist.losses.LOSSES", LOSSES, LOSS_NAMES)


def broadcast_class_prior(num_per_cls: dict, env: DistEnv) -> list[int]:
    """Rank 0's per-class training counts, checked on every rank against its own dataset.

    Every rank learns whether any rank disagrees (one all-reduce), so all of them stop together.
    """
    local = torch.tensor([num_per_cls[c] for c in sorted(num_per_cls)], dtype=torch.float64, device=env.device)
    prior = broadcast_from_main(local.clone())
    mismatch = all_reduce_max(torch.tensor([float(not torch.equal(prior, local))], device=env.device))
    if mismatch.item():
        raise BsdistError("the processes built different long-tailed training sets (class counts differ from "
                          "rank 0's); make sure every node reads the same DATASET.datadir files with the same config")
    return [int(n) for n in prior.tolist()]


def build_loss(name: str, num_per_cls: list[int]) -> nn.Module:
    return LOSSES[name](num_per_cls)
