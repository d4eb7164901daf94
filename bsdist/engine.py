"""One training epoch and one exact evaluation; both called identically by every rank."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bsdist.distributed import DistEnv, all_reduce_max, all_reduce_sum
from bsdist.errors import BsdistError, Stopped
from bsdist.metrics import EvalTally
from bsdist.models import grads_in_buckets, no_sync
from bsdist.optim import RunningStats, optimizer_step


@dataclass
class EpochProgress:
    """Where a checkpoint taken inside an epoch stands: optimiser steps done, the loss and the correct
    predictions so far."""
    step: int = 0
    loss_sum: float = 0.0
    images: float = 0.0
    correct: float = 0.0


@dataclass
class TrainState:
    """What the epoch loop needs besides the data; `step` counts optimiser steps since the run began."""
    model: torch.nn.Module  # what training runs: compiled and DDP-wrapped where there are several processes
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    grad_accum_steps: int
    nonfinite: str = "stop"  # or "skip"
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: only at epoch ends
    check_every: int = 20  # optimiser steps between the host's reads of the ranks' agreement
    save: Callable[[int, EpochProgress], None] = lambda epoch, progress: None  # mid-epoch checkpoint
    stop_requested: Callable[[], int] = lambda: 0  # the signal asking to stop, or 0
    last_checkpoint: str = ""  # where the last checkpoint written stands ("epoch 2 step 40"), for messages
    step: int = 0
    running_stats: RunningStats | None = None  # BatchNorm statistics a skipped step puts back (nonfinite skip)

    def __post_init__(self):
        if self.nonfinite == "skip" and self.running_stats is None:
            self.running_stats = RunningStats(self.model)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}  # TRAIN.mixed_precision, resolved


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class DeviceTally:
    """What the host learns only at check points, kept on the device meanwhile.

    Per optimiser step: the loss sum, image count and correct predictions (argmax of the logits, the
    ones used for prediction) of the step's micro-batches, the gradient norm, and whether any
    rank's loss was non-finite (one 1-element all-reduce, so every rank skips the same steps on the
    device). Per check point: one all-reduce of [non-finite steps, first such step, stop signal] and
    one host read; per log point one more for the loss sums.
    """

    def __init__(self, device: torch.device, progress: EpochProgress):
        f64 = dict(dtype=torch.float64, device=device)
        self.group = torch.zeros(3, **f64)  # loss sum, images, correct of the optimiser step being accumulated
        # the same for finite steps since the last log point, this rank, with their gradient norms and count
        self.pending = torch.zeros(5, **f64)
        self.epoch = torch.tensor([progress.loss_sum, progress.images, progress.correct], **f64)  # all ranks, logged
        # non-finite steps since the last check point, the first of them
        self.flags = torch.tensor([0.0, math.inf], **f64)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.group[0] += loss.detach().double() * len(targets)
        self.group[1] += len(targets)
        self.group[2] += (logits.detach().argmax(1) == targets).sum()

    def end_step(self, global_step: int, grad_norm: torch.Tensor) -> torch.Tensor:
        """Close the optimiser step whose (all-reduced) gradients have grad_norm; return its skip flag
        (float32 0/1, the same on every rank)."""
        skip = all_reduce_max((~torch.isfinite(self.group[:1])).float())
        norm = torch.stack([grad_norm.double(), torch.ones_like(grad_norm, dtype=torch.float64)])
        self.pending[:3] += self.group.where(skip == 0, 0.0)
        self.pending[3:] += norm.where((skip == 0) & torch.isfinite(grad_norm), 0.0)  # fp16's scaler may skip too
        self.flags[0] += skip[0]
        torch.minimum(self.flags[1:2], torch.full_like(self.flags[1:2], global_step).where(skip > 0, math.inf),
                      out=self.flags[1:2])
        self.group.zero_()
        return skip

    def agree(self, signal: int, out) -> tuple[int, int, int]:
        """(non-finite steps, the first of them, stop signal) over all ranks since the last call: one read."""
        bad, first, signum = agree(self.flags, signal, out)
        self.flags[0].zero_()
        self.flags[1].fill_(math.inf)
        return int(bad), int(first) if bad else 0, int(signum)

    def read_loss(self) -> tuple[float, float, float, float]:
        """Mean loss, accuracy, images and gradient norm over all ranks since the last call; adds the first
        three to the epoch's totals. (Every rank holds the same norms, so their sum over ranks divided by
        the steps summed over ranks is the mean.)"""
        all_reduce_sum(self.pending)
        loss_sum, images, correct, norm_sum, steps = self.pending.tolist()
        self.epoch += self.pending[:3]
        self.pending.zero_()
        return loss_sum / max(images, 1), correct / max(images, 1), images, norm_sum / steps if steps else math.nan

    def epoch_means(self) -> tuple[float, float]:
        """The epoch's mean loss and accuracy over all ranks' images."""
        loss_sum, images, correct = self.epoch.tolist()
        return loss_sum / max(images, 1), correct / max(images, 1)


def agree(flags: torch.Tensor, signal: int, out) -> list[float]:
    """flags (float64, on the device) with this rank's stop signal appended, max over all ranks, read once
    on the host. Every rank stops here together if rank 0 could not write a checkpoint."""
    both = torch.cat([flags, flags.new_zeros(2)])
    both[-2].fill_(signal)
    both[-1].fill_(float(bool(out.checkpoint_failed())))
    *values, write_failed = all_reduce_max(both).tolist()
    if write_failed:
        out.wait_for_checkpoints()  # rank 0 raises its write's error
        raise BsdistError("rank 0 could not write a checkpoint; its message says why")
    return values


@dataclass
class _Epoch:
    """The epoch being trained, as the check points report it."""
    epoch: int
    epochs: int
    steps: int  # optimiser steps in the epoch
    first_step: int  # the step it started from (a resume starts inside it)
    started: float
    tick: float  # when the loss was last read


def train_one_epoch(state: TrainState, data, env: DistEnv, out, epoch: int, epochs: int, log_interval: int,
                    progress: EpochProgress | None = None) -> tuple[float, float]:
    """Train one epoch (from `progress` when resuming inside it); return the mean loss and accuracy over
    all ranks' images.

    The host never waits for the device inside a step. A step with a non-finite loss on any rank is
    skipped on the device by every rank; the host learns of it, and of stop signals, at the next check
    point (every `check_every` steps, every log point, every checkpoint, the epoch's end), where all
    ranks stop, skip or checkpoint together. No checkpoint is written between a non-finite step and
    that check point.
    """
    progress = progress or EpochProgress()
    loader, accum = data.train, state.grad_accum_steps
    state.model.train()
    data.train_sampler.set_epoch(epoch)
    data.augment.set_epoch(epoch)
    num_micro = len(loader)
    loader.batch_sampler.start = progress.step * accum  # skip what the checkpoint already trained
    tally = DeviceTally(env.device, progress)
    now = time.perf_counter()
    here = _Epoch(epoch, epochs, -(-num_micro // accum), progress.step, now, now)
    for i, batch in enumerate(loader, start=progress.step * accum):
        group_size = min(accum, num_micro - (i - i % accum))  # the last group may be short
        last_of_group = i % accum == group_size - 1
        if state.running_stats is not None and i % accum == 0:
            state.running_stats.save()  # as they stand before the step's first micro-batch
        _micro_batch(state, data, env, batch, group_size, last_of_group, tally)
        if not last_of_group:
            continue
        step_in_epoch, lr = i // accum + 1, _optimizer_step(state, tally)
        mid_epoch = step_in_epoch < here.steps
        checkpoint_due = bool(mid_epoch and state.checkpoint_every and step_in_epoch % state.checkpoint_every == 0)
        log_due = step_in_epoch % log_interval == 0 or not mid_epoch
        if log_due or checkpoint_due or step_in_epoch % state.check_every == 0:
            _check_point(state, tally, out, here, step_in_epoch, lr, log_due, checkpoint_due)
    return tally.epoch_means()


def _micro_batch(state: TrainState, data, env: DistEnv, batch, group_size: int, last_of_group: bool, tally) -> None:
    """Forward and backward of one micro-batch; DDP all-reduces only on the last of its group."""
    images, targets, indices = batch
    images = images.to(env.device, non_blocking=True)
    targets = targets.to(env.device, non_blocking=True)
    indices = indices.to(env.device, non_blocking=True)  # pinned by a DataLoader: a blocking copy would wait
    inputs = data.augment(images, indices)
    with no_sync(state.model, last_of_group):
        with autocast(env.device, state.amp_dtype):
            logits = state.model(inputs)
        loss = state.criterion(logits, targets)
        state.scaler.scale(loss / group_size).backward()
    tally.add(loss, logits, targets)


def _optimizer_step(state: TrainState, tally: DeviceTally) -> float:
    """The optimiser step closing a group (skipped on the device where any rank's loss was non-finite);
    returns the learning rate it used."""
    lr = state.optimizer.param_groups[0]["lr"]
    if state.scaler.is_enabled():
        state.scaler.unscale_(state.optimizer)  # the norm of the true gradients; scaler.step knows they are unscaled
    grads = [p.grad for group in state.optimizer.param_groups for p in group["params"] if p.grad is not None]
    skip = tally.end_step(state.step + 1, torch.nn.utils.get_total_norm(grads))
    if state.running_stats is not None:
        state.running_stats.restore_if(skip)
    optimizer_step(state.optimizer, state.scaler, skip)
    state.optimizer.zero_grad(set_to_none=not grads_in_buckets(state.model))
    state.scheduler.step()
    state.step += 1
    return lr


def _check_point(state: TrainState, tally: DeviceTally, out, here: _Epoch, step_in_epoch: int, lr: float,
                 log_due: bool, checkpoint_due: bool) -> None:
    """Where the ranks agree (one read): stop or skip on non-finite losses, log, checkpoint, stop on a signal."""
    bad, first_bad, signum = tally.agree(state.stop_requested(), out)
    if bad:
        where = _describe_step(first_bad, here.steps)
        if state.nonfinite == "stop":
            if state.last_checkpoint:
                kept = (f"last.pt ({state.last_checkpoint}) is the last good point: continue from it with "
                        "TRAIN.nonfinite skip and TRAIN.resume auto, or")
            else:
                kept = "no checkpoint was written, so the next attempt starts afresh:"
            raise BsdistError(f"non-finite loss at {where}, a step that changed no weight; {kept} retry with a lower "
                              "OPTIMIZER.lr or TRAIN.mixed_precision no (under another DEFAULT.exp_name if last.pt "
                              "exists)")
        out.info(f"{bad} step(s) with a non-finite loss on some rank skipped, the first at {where} "
                 "(TRAIN.nonfinite skip)")
    mid_epoch = step_in_epoch < here.steps
    checkpoint_due = checkpoint_due or bool(signum and mid_epoch)
    if log_due or checkpoint_due:
        # waits for the device: the clock reads after it
        loss_mean, accuracy, images_seen, grad_norm = tally.read_loss()
        now = time.perf_counter()
        rate = images_seen / (now - here.tick)
        remaining = (here.epochs - here.epoch) * here.steps - step_in_epoch
        eta = (now - here.started) / (step_in_epoch - here.first_step) * remaining
        out.info(f"epoch {here.epoch + 1}/{here.epochs} step {step_in_epoch}/{here.steps} loss {loss_mean:.4f} "
                 f"lr {lr:.5f} {rate:.0f} img/s eta {_duration(eta)}")
        out.scalars({"train/loss": loss_mean, "train/acc": accuracy, "train/lr": lr, "train/img_per_s": rate,
                     "train/grad_norm": grad_norm}, state.step)
        here.tick = now
    if checkpoint_due:
        state.save(here.epoch, EpochProgress(step_in_epoch, *tally.epoch.tolist()))
    if signum and mid_epoch:
        raise Stopped(f"stopped by signal {signum} at epoch {here.epoch + 1} step {step_in_epoch}; last.pt holds "
                      "this point: continue with TRAIN.resume auto", signum)


def _describe_step(global_step: int, steps_per_epoch: int) -> str:
    return (f"epoch {(global_step - 1) // steps_per_epoch + 1} step {(global_step - 1) % steps_per_epoch + 1} "
            f"(global step {global_step})")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, num_classes: int, num_per_cls: list[int], env: DistEnv,
             amp_dtype: torch.dtype | None, fixed_batch: int | None = None) -> dict:
    """Metrics over every image of the split exactly once: this rank's shard, then all-reduced sums.

    The loss is cross-entropy on the raw logits, the ones used for prediction (the NLL); calibration
    bins give the ECE. With `fixed_batch` a short last batch is zero-padded to that size and the
    padding dropped from the logits, so a compiled model sees one shape and never recompiles.
    """
    model.eval()
    tally = EvalTally(num_classes, env.device)
    for images, targets, _ in loader:
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        n = len(targets)
        if fixed_batch and n < fixed_batch:
            images = torch.cat([images, images.new_zeros((fixed_batch - n, *images.shape[1:]))])
        with autocast(env.device, amp_dtype):
            logits = model(normalize(images))[:n].float()
        tally.add(logits, targets)
    tally.reduce(all_reduce_sum)
    return tally.summary(num_per_cls)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
