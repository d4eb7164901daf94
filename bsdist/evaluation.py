"""Exact evaluation, and the one evaluation forward pass it shares with the post-hoc feature pass."""

from __future__ import annotations

import torch

from bsdist.distributed import all_reduce_sum
from bsdist.metrics import EvalTally
from bsdist.runtime import Runtime


@torch.no_grad()
def forward_batches(model: torch.nn.Module, loader, normalize, runtime: Runtime, fixed_batch: int | None = None):
    """(float32 logits, targets) of each batch of this rank's shard, on the device, the model in eval mode.

    With `fixed_batch` a short last batch is zero-padded to that size and the padding dropped from the
    logits, so a compiled model sees one shape and never recompiles.
    """
    model.eval()
    for images, targets, _ in loader:
        images = images.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        n = len(targets)
        if fixed_batch and n < fixed_batch:
            images = torch.cat([images, images.new_zeros((fixed_batch - n, *images.shape[1:]))])
        with runtime.autocast():
            logits = model(normalize(images))[:n].float()
        yield logits, targets


def evaluate(model: torch.nn.Module, loader, normalize, num_classes: int, num_per_cls: list[int], runtime: Runtime,
             fixed_batch: int | None = None) -> dict:
    """Metrics over every image of the split exactly once: this rank's shard, then all-reduced sums.

    The loss is cross-entropy on the raw logits, the ones used for prediction (the NLL); calibration
    bins give the ECE.
    """
    tally = EvalTally(num_classes, runtime.device)
    for logits, targets in forward_batches(model, loader, normalize, runtime, fixed_batch):
        tally.add(logits, targets)
    tally.reduce(all_reduce_sum)
    return tally.summary(num_per_cls)
