"""A small BatchNorm-free model for tests that compare runs across world sizes.

BatchNorm statistics are per process unless MODEL.sync_bn is on, so only a model without them (or
with synchronised ones) ends a 2-process run with the weights of a 1-process run.
"""

import dataclasses

from torch import nn

from bsdist.config import FIELDS
from bsdist.models import MODELS


def tiny(num_classes: int, in_channels: int, stem: str = "cifar") -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, num_classes))


def wide(num_classes: int, in_channels: int, stem: str = "cifar") -> nn.Module:
    """tiny with a 2.8 MB head: at TRAIN.ddp_bucket_mb 1 its gradients fill three DDP buckets."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 16384), nn.ReLU(), nn.Linear(16384, num_classes))


def register() -> None:
    """The test models in the registry, and their names among MODEL.name's choices (bsdist's own are declared
    in the schema)."""
    MODELS.update(tiny=tiny, wide=wide, tiny_bn=tiny_bn, tiny_fc=TinyFc)
    name = FIELDS["MODEL.name"]
    FIELDS["MODEL.name"] = dataclasses.replace(name, choices=tuple(dict.fromkeys((*name.choices, *MODELS))))


def tiny_bn(num_classes: int, in_channels: int, stem: str = "cifar") -> nn.Module:
    """tiny with BatchNorm: 2 processes end with the weights of 1 only when BatchNorm is synchronised."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


class TinyFc(nn.Module):
    """tiny with BatchNorm and its classifier named fc, as bsdist's models have it (decoupled training and
    post-hoc methods find the classifier by that name)."""

    def __init__(self, num_classes: int, in_channels: int, stem: str = "cifar"):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
