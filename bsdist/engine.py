"""One training epoch and one exact evaluation; both called identically by every rank."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bsdist.distributed import DistEnv, all_reduce_sum
from bsdist.metrics import confusion_matrix, summarize


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
    step: int = 0


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_one_epoch(state: TrainState, data, env: DistEnv, out, epoch: int, epochs: int, log_interval: int) -> float:
    """Train one epoch; return the mean training loss over all ranks' images."""
    model, loader, accum = state.model, data.train, state.grad_accum_steps
    model.train()
    data.train_sampler.set_epoch(epoch)
    data.augment.set_epoch(epoch)
    num_micro = len(loader)
    steps_per_epoch = -(-num_micro // accum)
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, images: since the last log line
    epoch_totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    tick = start = time.perf_counter()
    for i, (images, targets, indices) in enumerate(loader):
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
        totals += torch.stack([loss.detach().double() * len(targets), totals.new_tensor(len(targets))])
        if not last_of_group:
            continue
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses, logged below
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step += 1
        step_in_epoch = i // accum + 1
        if step_in_epoch % log_interval == 0 or step_in_epoch == steps_per_epoch:
            all_reduce_sum(totals)
            now = time.perf_counter()
            loss_mean, images_seen = (totals[0] / totals[1]).item(), totals[1].item()
            rate = images_seen / (now - tick)
            eta = (now - start) / step_in_epoch * ((epochs - epoch) * steps_per_epoch - step_in_epoch)
            out.info(f"epoch {epoch + 1}/{epochs} step {step_in_epoch}/{steps_per_epoch} loss {loss_mean:.4f} "
                     f"lr {lr:.5f} {rate:.0f} img/s eta {_duration(eta)}")
            out.scalars({"train/loss": loss_mean, "train/lr": lr, "train/img_per_s": rate}, state.step)
            epoch_totals += totals
            totals.zero_()
            tick = now
    return (epoch_totals[0] / epoch_totals[1]).item()


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
