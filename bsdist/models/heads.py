"""Classifier heads other than the linear one, chosen by MODEL.classifier and put in place of a model's `fc`.

- cosine: NormedLinear of kaidic/LDAM-DRW (models/resnet_cifar.py lines 37-46), the classifier LDAM-DRW
  trains LDAMLoss on (cifar_train.py line 106): logits are the cosines between the L2-normalised features
  and the L2-normalised class weights, in [-1, 1], with no bias; LDAMLoss's LOSS.scale stretches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bsdist.config.schema import HEAD_NAMES, check_registry


class NormedLinear(nn.Module):
    """Cosine logits. The weight is (num_classes, in_features), nn.Linear's layout (the source's is its
    transpose), each class's row starting as uniform(-1, 1) scaled to norm 1, as the source's
    renorm_(2, 1, 1e-5).mul_(1e5) leaves its columns. Computes in fp32 under autocast, as Float32Linear does."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))
        with torch.no_grad():
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=1) @ F.normalize(self.weight, dim=1).T


# MODEL.classifier -> the head built as cls(in_features, num_classes) in place of a model's linear fc
HEADS = {"cosine": NormedLinear}
check_registry("bsdist.models.heads.HEADS", HEADS, HEAD_NAMES)
