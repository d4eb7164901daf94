"""One training epoch and one exact evaluation; both called identically by every rank."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bsdist.distributed import DistEnv, all_reduce_max, all_reduce_sum
from bsdist.errors import BsdistError, Stopped
from bsdist.metrics import confusion_matrix, summarize


@dataclass
class EpochProgress:
    """Where a checkpoint taken inside an epoch stands: optimiser steps done and the loss so far."""
    step: int = 0
    loss_sum: float = 0.0
    images: float = 0.0


@dataclass
class TrainState:
    """What the epoch loop needs besides the data; `step` counts optimiser steps since the run began."""
    model: torch.nn.Module  # DDP-wrapped
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    grad_accum_steps: int
    nonfinite: str = "stop"  # or "skip"
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: only at epoch ends
    save: Callable[[int, EpochProgress], None] = lambda epoch, progress: None  # mid-epoch checkpoint
    stop_requested: Callable[[], int] = lambda: 0  # the signal asking to stop, or 0
    step: int = 0


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_one_epoch(state: TrainState, data, env: DistEnv, out, epoch: int, epochs: int, log_interval: int,
                    progress: EpochProgress | None = None) -> float:
    """Train one epoch (from `progress` when resuming inside it); return the mean loss over all ranks' images.

    After every optimiser step one all-reduce tells every rank whether any rank saw a non-finite loss
    or was asked to stop, so all of them skip, stop or checkpoint at the same step.
    """
    progress = progress or EpochProgress()
    model, loader, accum = state.model, data.train, state.grad_accum_steps
    model.train()
    data.train_sampler.set_epoch(epoch)
    data.augment.set_epoch(epoch)
    num_micro = len(loader)
    steps_per_epoch = -(-num_micro // accum)
    loader.batch_sampler.start = progress.step * accum  # skip what the checkpoint already trained
    pending = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, images: not yet all-reduced
    group = torch.zeros(2, dtype=torch.float64, device=env.device)  # the same, for this optimiser step
    epoch_totals = torch.tensor([progress.loss_sum, progress.images], dtype=torch.float64, device=env.device)
    tick = start = time.perf_counter()
    first_step = progress.step
    for i, (images, targets, indices) in enumerate(loader, start=progress.step * accum):
        group_start = i - i % accum
        group_size = min(accum, num_micro - group_start)
        last_of_group = i - group_start == group_size - 1
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        inputs = data.augment(images, indices)
        with contextlib.nullcontext() if last_of_group else model.no_sync():
            with autocast(env.device, state.amp_dtype):
                logits = model(inputs)
            loss = state.criterion(logits, targets)
            state.scaler.scale(loss / group_size).backward()
        group += torch.stack([loss.detach().double() * len(targets), group.new_tensor(len(targets))])
        if not last_of_group:
            continue
        step_in_epoch = i // accum + 1
        flags = all_reduce_max(torch.tensor([float(not torch.isfinite(group[0])), float(state.stop_requested())],
                                            device=env.device))
        nonfinite, signum = (int(v) for v in flags.tolist())
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses, logged below
        if nonfinite and state.nonfinite == "stop":
            raise BsdistError(f"non-finite loss at epoch {epoch + 1} step {step_in_epoch} (lr {lr:.5g}); last.pt holds the last "
                              "good checkpoint: lower OPTIMIZER.lr, try TRAIN.mixed_precision no, or set TRAIN.nonfinite skip")
        if nonfinite:
            out.info(f"epoch {epoch + 1} step {step_in_epoch}: non-finite loss on some rank, step skipped (TRAIN.nonfinite skip)")
        else:
            state.scaler.step(state.optimizer)
            state.scaler.update()
            pending += group
        group.zero_()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step += 1
        checkpoint_due = step_in_epoch < steps_per_epoch and (
            signum or (state.checkpoint_every and step_in_epoch % state.checkpoint_every == 0))
        if step_in_epoch % log_interval == 0 or step_in_epoch == steps_per_epoch or checkpoint_due:
            all_reduce_sum(pending)
            now = time.perf_counter()
            loss_mean, images_seen = (pending[0] / pending[1].clamp(min=1)).item(), pending[1].item()
            rate = images_seen / (now - tick)
            eta = (now - start) / (step_in_epoch - first_step) * ((epochs - epoch) * steps_per_epoch - step_in_epoch)
            out.info(f"epoch {epoch + 1}/{epochs} step {step_in_epoch}/{steps_per_epoch} loss {loss_mean:.4f} "
                     f"lr {lr:.5f} {rate:.0f} img/s eta {_duration(eta)}")
            out.scalars({"train/loss": loss_mean, "train/lr": lr, "train/img_per_s": rate}, state.step)
            epoch_totals += pending
            pending.zero_()
            tick = now
        if checkpoint_due:
            state.save(epoch, EpochProgress(step_in_epoch, *epoch_totals.tolist()))
        if signum and step_in_epoch < steps_per_epoch:
            raise Stopped(f"stopped by signal {signum} at epoch {epoch + 1} step {step_in_epoch}; last.pt holds this point: "
                          "continue with TRAIN.resume auto", signum)
    return (epoch_totals[0] / epoch_totals[1].clamp(min=1)).item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, num_classes: int, num_per_cls: list[int], env: DistEnv,
             amp_dtype: torch.dtype | None, fixed_batch: int | None = None) -> dict:
    """Metrics over every image of the split exactly once: this rank's shard, then one all-reduce.

    The loss is cross-entropy on the raw logits, the ones used for prediction. With `fixed_batch` a
    short last batch is zero-padded to that size and the padding dropped from the logits, so a
    compiled model sees one shape and never recompiles.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=env.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=env.device)
    for images, targets, _ in loader:
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        n = len(targets)
        if fixed_batch and n < fixed_batch:
            images = torch.cat([images, images.new_zeros((fixed_batch - n, *images.shape[1:]))])
        with autocast(env.device, amp_dtype):
            logits = model(normalize(images))[:n].float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        confusion += confusion_matrix(logits.argmax(1), targets, num_classes)
    all_reduce_sum(confusion)
    all_reduce_sum(loss_sum)
    return summarize(confusion, num_per_cls, loss_sum.item())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
