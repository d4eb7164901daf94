"""What a run tells its reader (through rank 0's output): the start-up lines, each epoch's records,
and positions in the run in words."""

from __future__ import annotations

import os

from bsdist import config
from bsdist.output import BEST


def announce(trainer, resume_from: str | None) -> None:
    """The lines that say what this run is: processes, data, runtime, BatchNorm, selection, resume."""
    cfg, out, rt = trainer.cfg, trainer.out, trainer.runtime
    out.info(f"{rt.world_size} process(es) on {rt.device.type}; "
             f"{len(trainer.data.train.dataset)} training images {list(trainer.num_per_cls)}; "
             f"run directory {config.run_dir(cfg)}")
    out.info(f"runtime: {rt.describe()} (runtime.json)", console=False)
    if trainer.stage1:
        out.info(f"stage 2 (cRT) of {os.path.dirname(trainer.stage1)}: its selected model's backbone frozen, "
                 f"BatchNorm included; the classifier re-initialised and trained with {cfg.LOSS.name} and "
                 f"{cfg.DATASET.sampler.replace('_', '-')} sampling")
    else:
        out.info(f"BatchNorm {'synchronised across processes' if rt.sync_bn else 'per process'}: "
                 f"{rt.sync_bn_reason}")
    if trainer.select_on == "test":
        out.info("model selection (best.pt) uses the test set, as the published recipes do; "
                 "set DATASET.val_per_cls > 0 to select on a held-out validation split")
    if resume_from:
        out.info(f"resumed from {resume_from} at epoch {trainer.epochs_done + 1} step {trainer.progress.step} "
                 f"(global step {trainer.method.step})")


def record_epoch(out, epoch: int, step: int, evaluated: dict, best: dict, select_on: str, metric: str,
                 train: dict) -> None:
    """An evaluated epoch in TensorBoard, metrics.csv and the log; train holds its loss, acc, lr and seconds."""
    for split, metrics in evaluated.items():
        out.eval_metrics(split, metrics, step)
    out.scalars({f"test/best_{k}": best[k] for k in BEST}, step)
    out.scalars({"train/epoch_acc": train["acc"], "train/epoch_seconds": train["seconds"]}, step)
    out.epoch_row({"epoch": epoch + 1, "step": step, "train_loss": train["loss"], "train_acc": train["acc"],
                   "lr": train["lr"], "seconds": round(train["seconds"], 3),
                   **{f"{split}_{k}": m[k] for split, m in evaluated.items()
                      for k in ("loss", "acc", "bcr", "many", "medium", "few", "ece")}})
    out.info(f"epoch {epoch + 1}: "
             + "  ".join(f"{split} acc {m['acc']:.4f} bcr {m['bcr']:.4f}" for split, m in evaluated.items())
             + f"  best {select_on} {metric} {best['score']:.4f} (epoch {best['epoch']})")


def position(epochs_done: int, step_in_epoch: int) -> str:
    """Where a checkpoint stands, in words."""
    return f"epoch {epochs_done + 1} step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epochs_done}"


def describe_step(global_step: int, steps_per_epoch: int) -> str:
    return (f"epoch {(global_step - 1) // steps_per_epoch + 1} step {(global_step - 1) % steps_per_epoch + 1} "
            f"(global step {global_step})")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def nonfinite_stop(where: str, last_checkpoint: str) -> str:
    """Why a run with TRAIN.nonfinite stop stopped, and how to go on."""
    if last_checkpoint:
        kept = (f"last.pt ({last_checkpoint}) is the last good point: continue from it with TRAIN.nonfinite skip "
                "and TRAIN.resume auto, or")
    else:
        kept = "no checkpoint was written, so the next attempt starts afresh:"
    return (f"non-finite loss at {where}, a step that changed no weight; {kept} retry with a lower OPTIMIZER.lr or "
            "TRAIN.mixed_precision no (under another DEFAULT.exp_name if last.pt exists)")
