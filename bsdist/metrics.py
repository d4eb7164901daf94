"""Everything reported comes from sums that ranks all-reduce exactly (EvalTally): the confusion matrix
(rows: true class, columns: prediction) up to CONFUSION_CLASSES classes, and beyond that each class's
images and correct predictions (8,142 classes would make a 530 MB int64 matrix; the two counts are
130 KB), the loss sum, and a table of confidence bins for calibration.

Shot groups follow the long-tail literature: many-shot classes have > 100 training images,
medium-shot 20-100, few-shot < 20. A group with no class is reported as None.

Calibration follows Guo et al. (ICML 2017): the confidence is the top softmax probability, binned
into CALIBRATION_BINS equal-width bins (0, 1/15], (1/15, 2/15], ...; the expected calibration error
is sum over bins of |correct - confidence sum| / images, and NLL is the mean cross-entropy of the
logits used for prediction (the split's loss).
"""

from __future__ import annotations

import math

import torch

MANY_SHOT, FEW_SHOT = 100, 20
CALIBRATION_BINS = 15
CONFUSION_CLASSES = 100  # beyond this, per-class counts instead of the matrix (in results.json too)


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Counts (float64) of (true class, prediction), added into `out` where given. index_add_ into a
    tensor of fixed size reads nothing from the device (CUDA's bincount reads the largest index first)."""
    if out is None:
        out = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=targets.device)
    ones = torch.ones(len(targets), dtype=torch.float64, device=targets.device)
    out.view(-1).index_add_(0, targets.long() * num_classes + predictions.long(), ones)
    return out


def calibration_bins(logits: torch.Tensor, targets: torch.Tensor, bins: int = CALIBRATION_BINS) -> torch.Tensor:
    """bins x [images, sum of confidences, correct predictions] (float64), on the logits' device."""
    confidence, prediction = logits.float().softmax(1).max(1)
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    values = torch.stack([torch.ones_like(confidence), confidence, (prediction == targets).float()], 1).double()
    return torch.zeros(bins, 3, dtype=torch.float64, device=logits.device).index_add_(0, which, values)


def expected_calibration_error(bins) -> float:
    """sum over bins of |correct - confidence| / images, from calibration_bins' table (a tensor or lists)."""
    table = torch.as_tensor(bins, dtype=torch.float64)
    return (table[:, 2] - table[:, 1]).abs().sum().item() / max(table[:, 0].sum().item(), 1.0)


def shot_groups(num_per_cls: list[int]) -> dict[str, list[int]]:
    return {
        "many": [c for c, n in enumerate(num_per_cls) if n > MANY_SHOT],
        "medium": [c for c, n in enumerate(num_per_cls) if FEW_SHOT <= n <= MANY_SHOT],
        "few": [c for c, n in enumerate(num_per_cls) if n < FEW_SHOT],
    }


class EvalTally:
    """The sums of one evaluation on this rank's shard, on the device: add batches, all-reduce, summarize.
    Adding reads nothing from the device: index_add_ into tensors of fixed size (CUDA's bincount reads
    the largest index first), no boolean mask. Counts are float64, exact to 2**53 images."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.full = num_classes <= CONFUSION_CLASSES
        shape = (num_classes, num_classes) if self.full else (2, num_classes)  # the matrix, or images and correct
        self.counts = torch.zeros(shape, dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        self.calibration = torch.zeros(CALIBRATION_BINS, 3, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """A batch of fp32 logits (the ones used for prediction) and their targets."""
        if not len(targets):
            return
        predictions = logits.argmax(1)
        if self.full:
            confusion_matrix(predictions, targets, self.num_classes, out=self.counts)
        else:
            self.counts[0].index_add_(0, targets, torch.ones(len(targets), dtype=torch.float64, device=targets.device))
            self.counts[1].index_add_(0, targets, (predictions == targets).double())
        self.loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        self.calibration += calibration_bins(logits, targets)

    def reduce(self, all_reduce_sum) -> None:
        for total in (self.counts, self.loss_sum, self.calibration):
            all_reduce_sum(total)

    def summary(self, num_per_cls: list[int]) -> dict:
        loss_sum = self.loss_sum.item()
        if self.full:
            return summarize(self.counts, num_per_cls, loss_sum, self.calibration)
        support, correct = self.counts.cpu()
        return summarize_counts(support, correct, num_per_cls, loss_sum, self.calibration)


def summarize(confusion: torch.Tensor, num_per_cls: list[int], loss_sum: float,
              calibration: torch.Tensor | None = None) -> dict:
    """summarize_counts from a confusion matrix, which the result holds as well."""
    confusion = confusion.double().cpu()
    result = summarize_counts(confusion.sum(1), confusion.diagonal(), num_per_cls, loss_sum, calibration)
    result["confusion"] = confusion.long().tolist()
    return result


def summarize_counts(support: torch.Tensor, correct: torch.Tensor, num_per_cls: list[int], loss_sum: float,
                     calibration: torch.Tensor | None = None) -> dict:
    """acc, bcr (mean recall over classes present in the split), per-class recall, shot groups, loss;
    with the calibration bins, ECE, NLL (the loss) and the bins themselves (for reliability diagrams)."""
    support, correct = support.double(), correct.double()
    total = support.sum().item()
    recall = [(correct[c] / support[c]).item() if support[c] > 0 else math.nan for c in range(len(support))]
    present = [r for r in recall if not math.isnan(r)]
    result = {
        "acc": correct.sum().item() / total,
        "bcr": sum(present) / len(present),
        "loss": loss_sum / total,
        "num_images": int(total),
    }
    for group, classes in shot_groups(num_per_cls).items():
        values = [recall[c] for c in classes if not math.isnan(recall[c])]
        result[group] = sum(values) / len(values) if values else None
    if calibration is not None:
        result["ece"] = expected_calibration_error(calibration)
        result["nll"] = result["loss"]
        result["calibration"] = calibration.cpu().tolist()
    result["per_class_recall"] = [None if math.isnan(r) else r for r in recall]
    return result


def describe_best(best: dict) -> str:
    """The one-line account of a run's best model that the run, a sweep and a SLURM --wait print."""
    return f"best (epoch {best['epoch']}) test acc {best['acc']:.4f} bcr {best['bcr']:.4f}"
