"""Everything reported comes from one global confusion matrix (rows: true class, columns: prediction),
and calibration from one global table of confidence bins; both are sums, so ranks all-reduce them exactly.

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


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


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


def summarize(confusion: torch.Tensor, num_per_cls: list[int], loss_sum: float, calibration: torch.Tensor | None = None) -> dict:
    """acc, bcr (mean recall over classes present in the split), per-class recall, shot groups, loss;
    with the calibration bins, ECE, NLL (the loss) and the bins themselves (for reliability diagrams)."""
    confusion = confusion.double().cpu()
    support = confusion.sum(1)
    total = support.sum().item()
    recall = [(confusion[c, c] / support[c]).item() if support[c] > 0 else math.nan for c in range(len(support))]
    present = [r for r in recall if not math.isnan(r)]
    result = {
        "acc": confusion.trace().item() / total,
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
    result["confusion"] = confusion.long().tolist()
    return result


def describe_best(best: dict) -> str:
    """The one-line account of a run's best model that the run, a sweep and a SLURM --wait print."""
    return f"best (epoch {best['epoch']}) test acc {best['acc']:.4f} bcr {best['bcr']:.4f}"
