"""Training losses: one module each, one line in LOSSES (registry.py), built for the run's MethodContext."""

from bsdist.losses.balanced_softmax import BalancedSoftmax
from bsdist.losses.base import Loss
from bsdist.losses.cross_entropy import CrossEntropyLoss
from bsdist.losses.registry import LOSSES, build_loss

__all__ = ["LOSSES", "BalancedSoftmax", "CrossEntropyLoss", "Loss", "build_loss"]
