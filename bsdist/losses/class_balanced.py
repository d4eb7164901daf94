"""The class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019).

Each image's loss is weighted by its class's (1 - beta) / (1 - beta^n_c), the inverse of the class's
effective number of samples, the weights scaled to sum to the number of classes, as
richardaecn/class-balanced-loss src/cifar_main.py computes them (lines 425-430). The weighted loss is
one of the three of its `_tower_fn` (lines 323-342), LOSS.cb_loss_type:
- softmax: cross-entropy times the image's weight, averaged over the images (tf.losses.softmax_cross_entropy
  with per-image weights: their sum divided by the number of non-zero weights, every weight being positive);
- sigmoid: binary cross-entropy of every logit against the one-hot target, times the image's weight, summed
  and divided by the number of positive labels (the batch size);
- focal: as sigmoid, each term times the focal modulator (1 - p_t)^gamma, which focal_loss (lines 226-266)
  computes stably as exp(-gamma * y * z - gamma * log(1 + exp(-z))).
beta 0 weights every class 1: plain softmax cross-entropy, sigmoid cross-entropy, and the sigmoid focal loss
of Lin et al. (2017).

Where bsdist departs: the source starts the sigmoid and focal classifiers' bias at -log(C - 1)
(src/model_base.py line 196) and keeps that bias out of weight decay (cifar_main.py lines 348-351);
bsdist's classifier starts as any other and every parameter is decayed alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdist.losses.base import Loss


def effective_number_weights(num_per_cls: list[int], beta: float) -> torch.Tensor:
    """Per-class weights (1 - beta) / (1 - beta^n_c) scaled to sum to the number of classes, in float64
    (beta 0.9999 to the power of a few thousand images loses digits in float32)."""
    counts = torch.tensor(num_per_cls, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts))
    return weights / weights.sum() * len(num_per_cls)


class ClassBalancedLoss(Loss):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.positive_counts()  # a class without images would get an infinite weight
        self.loss_type, self.gamma = settings.cb_loss_type, settings.gamma  # LOSS.cb_loss_type, LOSS.gamma
        self.class_weights = effective_number_weights(context.num_per_cls, settings.beta).float().to(
            context.log_prior.device)  # built once, on the training device: the step copies nothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = self.class_indices(target)
        logits = logits.float()
        image_weights = self.class_weights[target]
        if self.loss_type == "softmax":
            return (image_weights * F.cross_entropy(logits, target, reduction="none")).mean()
        one_hot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
        per_logit = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
        if self.loss_type == "focal" and self.gamma:
            # log(1 + exp(-z)) is softplus(-z), which does not overflow for very negative z
            per_logit = torch.exp(-self.gamma * (one_hot * logits + F.softplus(-logits))) * per_logit
        return (image_weights[:, None] * per_logit).sum() / len(target)
