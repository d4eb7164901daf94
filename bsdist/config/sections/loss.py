"""The LOSS section: the training loss and its method's hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass

from bsdist.config.fields import fraction, non_negative, option, positive
from bsdist.config.names import LOSS_NAMES


@dataclass(frozen=True)
class Loss:
    name: str = option("BalancedSoftmax", "training loss", choices=LOSS_NAMES)
    tau: float = option(1.0, "LogitAdjustedLoss: trains on logits + tau * log(class prior) (Menon et al. 2021); 1 is "
                             "Balanced Softmax, 0 cross-entropy", check=non_negative)
    max_margin: float = option(0.5, "LDAMLoss: the largest class margin (the rarest class's), margins going as "
                                    "n_c^(-1/4) (Cao et al. 2019)", check=positive)
    scale: float = option(30.0, "LDAMLoss: the logits' scale s (cosine logits lie in [-1, 1])", check=positive)
    drw_epoch: int | None = option(160, "LDAMLoss: deferred re-weighting: from this epoch on (counted from 0) the "
                                        "loss weights classes by their class-balanced weight (LOSS.beta); null "
                                        "never re-weights", kind="int", nullable=True,
                                  check=non_negative)
    beta: float = option(0.9999, "ClassBalancedLoss and LDAMLoss's re-weighting: class weights (1 - beta) / (1 - "
                                 "beta^n_c), summing to the number of classes (Cui et al. 2019); 0 weights every "
                                 "class 1", check=fraction)
    gamma: float = option(1.0, "FocalLoss and ClassBalancedLoss focal: the focal exponent, (1 - p_t)^gamma (Lin et "
                               "al. 2017); 0 is cross-entropy", check=non_negative)
    cb_loss_type: str = option("softmax", "ClassBalancedLoss: the weighted loss, softmax cross-entropy, sigmoid "
                                          "(binary) cross-entropy or sigmoid focal", choices=("softmax", "sigmoid",
                                                                                              "focal"))
