"""The one context a training method reads: a loss, a sampler, an augmentation, a classifier head or a
second stage gets what it needs from the run here, never from the Trainer. Each field is here for a
method that needs it; the Trainer keeps `epoch` and `step` current on the host (plain ints, between
steps), so reading them costs the device nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from bsdist.distributed import DistEnv, any_rank, broadcast_from_main
from bsdist.errors import BsdistError


@dataclass
class MethodContext:
    num_per_cls: list[int]  # training images per class, rank 0's: Balanced Softmax, logit adjustment, LDAM's margins
    log_prior: torch.Tensor  # log num_per_cls on the training device (float64, rounded once to float32): BS, LA
    # the model's classifier, looked up when a method asks (a model without one fails only then): LDAM's cosine
    # classifier, tau-normalisation
    head: Callable[[], nn.Module]
    epoch: int = 0  # the epoch being trained (from 0): DRW re-weights the loss from an epoch on
    step: int = 0  # optimiser steps done since the run began: the run's step counter, checkpointed
    # called after every optimiser step, on the host: a method's own extra step (a meta-learned sampler
    # updating itself from a held-out batch)
    step_hooks: list[Callable[[MethodContext], None]] = field(default_factory=list)

    @classmethod
    def of(cls, num_per_cls: list[int], head: Callable[[], nn.Module], device: torch.device | str = "cpu"
           ) -> MethodContext:
        log_prior = torch.tensor(num_per_cls, dtype=torch.float64).log().float().to(device)
        return cls(list(num_per_cls), log_prior, head)

    def on_step(self, hook: Callable[[MethodContext], None]) -> None:
        """Run hook(context) after every optimiser step."""
        self.step_hooks.append(hook)

    def step_done(self) -> None:
        self.step += 1
        for hook in self.step_hooks:
            hook(self)


def broadcast_class_prior(num_per_cls: dict, env: DistEnv) -> list[int]:
    """Rank 0's per-class training counts, checked on every rank against its own dataset.

    Every rank learns whether any rank disagrees (one all-reduce), so all of them stop together.
    """
    local = torch.tensor([num_per_cls[c] for c in sorted(num_per_cls)], dtype=torch.float64, device=env.device)
    prior = broadcast_from_main(local.clone())
    if any_rank(not torch.equal(prior, local), env.device):
        raise BsdistError("the processes built different long-tailed training sets (class counts differ from "
                          "rank 0's); make sure every node reads the same DATASET.datadir files with the same config")
    return [int(n) for n in prior.tolist()]
