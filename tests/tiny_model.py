"""A small BatchNorm-free model for tests that compare runs across world sizes.

BatchNorm statistics are per process (SyncBatchNorm needs CUDA), so only a model without them can
end a 2-process run with exactly the weights of a 1-process run.
"""

from torch import nn

from bsdist.models import MODELS


def tiny(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, num_classes))


def register() -> None:
    MODELS["tiny"] = tiny
