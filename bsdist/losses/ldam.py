"""The label-distribution-aware margin loss with deferred re-weighting (LDAM-DRW; Cao et al., NeurIPS 2019).

As kaidic/LDAM-DRW computes it: the target class's logit is lowered by the margin m_c proportional to
n_c^(-1/4), the largest margin being LOSS.max_margin (losses.py lines 26-28), then cross-entropy of
LOSS.scale times those logits (line 43); the source trains it on cosine logits (models/resnet_cifar.py
NormedLinear, lines 37-46: MODEL.classifier cosine), with max_m 0.5 and s 30 (cifar_train.py line 213).

Deferred re-weighting (cifar_train.py lines 199-206): from epoch LOSS.drw_epoch on (counted from 0; 160 in the
source, `epoch // 160`), the cross-entropy weights each image by its class's class-balanced weight with
beta 0.9999 (LOSS.beta; bsdist.losses.class_balanced), a weighted mean (sum of w_y * loss over the sum of
w_y, as torch's cross_entropy with `weight` averages); before it, every weight is 1 (the source's beta 0).
The switch reads only MethodContext.epoch, which the Trainer sets before each epoch and a resume restores.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bsdist.distributed import all_reduce_sum
from bsdist.losses.base import Loss
from bsdist.losses.class_balanced import effective_number_weights


class LDAMLoss(Loss):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.positive_counts()  # a class without images would get an infinite margin
        device = context.log_prior.device
        margins = torch.tensor(context.num_per_cls, dtype=torch.float64) ** -0.25
        self.margins = (margins * (settings.max_margin / margins.max())).float().to(device)
        self.scale, self.drw_epoch = settings.scale, settings.drw_epoch  # LOSS.scale, LOSS.drw_epoch
        # built once, on the training device: the switch picks a tensor and copies nothing
        self.drw_weights = effective_number_weights(context.num_per_cls, settings.beta).float().to(device)

    def class_weights(self) -> torch.Tensor | None:
        """The cross-entropy's per-class weights in the current epoch: none before LOSS.drw_epoch."""
        deferred = self.drw_epoch is None or self.context.epoch < self.drw_epoch
        return None if deferred else self.drw_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = self.class_indices(target)
        logits = logits.float()
        one_hot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
        with_margin = logits - one_hot * self.margins[target][:, None]
        weights = self.class_weights()
        if weights is None:
            return F.cross_entropy(self.scale * with_margin, target)
        return global_weighted_mean(F.cross_entropy(self.scale * with_margin, target, reduction="none"),
                                    weights[target])


def global_weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(weights * values) / sum(weights) over the global micro-batch, every rank's images, as one process
    (the source's DataParallel) computes it. A rank's own weighted mean would not do: DDP averages the ranks'
    gradients, and the mean of per-rank weighted means is not the weighted mean. So each rank divides its sum by
    the ranks' summed weights over the world size (one all-reduce of one number per micro-batch, every rank
    alike; it stays on the device)."""
    total = weights.sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = all_reduce_sum(total.detach().clone()) / dist.get_world_size()
    return (weights * values).sum() / total
