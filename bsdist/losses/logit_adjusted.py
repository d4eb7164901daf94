"""The logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

Training on logits + tau * log(prior), the prior being the training class frequencies, as
google-research/logit_adjustment's main.py does in its `loss` mode (FLAGS.tau, default 1.0). Adding
log(n_c) instead of log(n_c / n) changes every logit of an image by the same constant, which the softmax
ignores; at tau 1 the loss is Balanced Softmax, and tau 0 cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bsdist.losses.base import Loss


class LogitAdjustedLoss(Loss):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.tau = settings.tau  # LOSS.tau
        self.log_prior = self.positive_counts()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.tau * self.log_prior, target)
