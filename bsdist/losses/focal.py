"""The focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), over the softmax.

-(1 - p_y)^gamma log p_y averaged over the images, p_y the softmax probability of the target class, as
kaidic/LDAM-DRW losses.py computes it (focal_loss and FocalLoss, lines 7-21: p = exp(-cross-entropy)) and
cifar_train.py trains its Focal baseline (gamma 1, line 215). gamma 0 is cross-entropy. The sigmoid form of
the paper, one binary loss per class, is ClassBalancedLoss with LOSS.cb_loss_type focal and LOSS.beta 0.

With 0 < gamma < 1 the gradient of (1 - p)^gamma is infinite where p rounds to 1 (an image whose
cross-entropy is 0 in float32), as in the source; TRAIN.nonfinite decides what such a step does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdist.losses.base import Loss


class FocalLoss(Loss):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.gamma = settings.gamma  # LOSS.gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cross_entropy = F.cross_entropy(logits.float(), self.class_indices(target), reduction="none")
        return ((-torch.expm1(-cross_entropy)) ** self.gamma * cross_entropy).mean()  # 1 - p, without cancelling
