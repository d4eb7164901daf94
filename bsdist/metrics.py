"""Everything reported comes from one global confusion matrix (rows: true class, columns: prediction).

Shot groups follow the long-tail literature: many-shot classes have > 100 training images,
medium-shot 20-100, few-shot < 20. A group with no class is reported as None.
"""

from __future__ import annotations

import math

import torch

MANY_SHOT, FEW_SHOT = 100, 20


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def shot_groups(num_per_cls: list[int]) -> dict[str, list[int]]:
    return {
        "many": [c for c, n in enumerate(num_per_cls) if n > MANY_SHOT],
        "medium": [c for c, n in enumerate(num_per_cls) if FEW_SHOT <= n <= MANY_SHOT],
        "few": [c for c, n in enumerate(num_per_cls) if n < FEW_SHOT],
    }


def summarize(confusion: torch.Tensor, num_per_cls: list[int], loss_sum: float) -> dict:
    """acc, bcr (mean recall over classes present in the split), per-class recall, shot groups, loss."""
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
    result["per_class_recall"] = [None if math.isnan(r) else r for r in recall]
    result["confusion"] = confusion.long().tolist()
    return result


def describe_best(best: dict) -> str:
    """The one-line account of a run's best model that the run, a sweep and a SLURM --wait print."""
    return f"best (epoch {best['epoch']}) test acc {best['acc']:.4f} bcr {best['bcr']:.4f}"
