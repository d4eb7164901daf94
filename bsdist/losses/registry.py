"""LOSS.name -> the Loss it builds."""

from __future__ import annotations

from bsdist.config.schema import LOSS_NAMES, check_registry
from bsdist.losses.balanced_softmax import BalancedSoftmax
from bsdist.losses.base import Loss
from bsdist.losses.class_balanced import ClassBalancedLoss
from bsdist.losses.cross_entropy import CrossEntropyLoss
from bsdist.losses.focal import FocalLoss
from bsdist.losses.ldam import LDAMLoss
from bsdist.losses.logit_adjusted import LogitAdjustedLoss
from bsdist.method import MethodContext

LOSSES = {
    "CrossEntropyLoss": CrossEntropyLoss,
    "BalancedSoftmax": BalancedSoftmax,
    "LogitAdjustedLoss": LogitAdjustedLoss,
    "LDAMLoss": LDAMLoss,
    "ClassBalancedLoss": ClassBalancedLoss,
    "FocalLoss": FocalLoss,
}
check_registry("bsdist.losses.LOSSES", LOSSES, LOSS_NAMES)


def build_loss(settings, context: MethodContext) -> Loss:
    """The loss settings (the config's LOSS section) name, built for the run's context."""
    return LOSSES[settings.name](settings, context)
