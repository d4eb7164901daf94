"""Checks 5 and 6 on the training step: compiled fp16 with GradScaler ends finite (fp16_scaler), and
steady-state steps never wait for the device (no_host_sync, with SyncGuard)."""

from __future__ import annotations

import contextlib
import math
import os
import traceback

import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.runs import Context, Run, Skip, require
from timing import ROOT
from timing.training import Trainer

import bsdist.engine as engine
from bsdist.data.augment import BatchAugment


def check_fp16_scaler(ctx: Context):
    if not ctx.cuda:
        raise Skip("needs CUDA: fp16 autocast on this CPU is emulated and about 15x slower than fp32")
    run = Run(ctx, "fp16", ["TRAIN.mixed_precision", "fp16", "TRAIN.compile", "true"]).succeeded()
    with open(os.path.join(run.run_dir, "metrics.csv")) as f:
        losses = [float(line.split(",")[2]) for line in f.read().splitlines()[1:]]
    test_loss = run.results()["last"]["loss"]
    figures = {"train_loss": losses, "test_loss": test_loss}
    require(bool(losses) and all(math.isfinite(x) for x in [*losses, test_loss]), f"non-finite loss: {figures}",
            figures)
    return f"compiled fp16 with GradScaler, 1 epoch: train loss {losses[-1]:.4f}, test loss {test_loss:.4f}", figures


class SyncGuard:
    """CUDA's sync debug mode at "error" for the device work of training steps, off around the host's reads.

    It goes on after the first optimiser step (and at each later micro-batch's augmentation) and off
    just before each read point (engine.agree, DeviceTally.read_loss), where it stays until the next
    micro-batch: the epoch's last read is followed by the epoch's `.item()`. On CPU the same wrappers run
    and count, with nothing to switch.
    """

    def __init__(self, cuda: bool):
        self.cuda, self.armed, self.on = cuda, False, False
        self.counts = {"steps_checked": 0, "agree": 0, "read_loss": 0}

    def switch(self, on: bool) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error" if on else "default")
        self.on = on

    @contextlib.contextmanager
    def installed(self):
        step, agree, read_loss, augment = (engine.optimizer_step, engine.agree, engine.DeviceTally.read_loss,
                                           BatchAugment.__call__)
        guard = self

        def guarded_step(*args, **kwargs):
            guard.counts["steps_checked"] += guard.on  # this step's forward and backward ran with the mode on
            step(*args, **kwargs)
            guard.armed = True
            guard.switch(True)

        def guarded_agree(*args, **kwargs):
            guard.switch(False)
            guard.counts["agree"] += 1
            return agree(*args, **kwargs)

        def guarded_read_loss(tally):
            guard.switch(False)
            guard.counts["read_loss"] += 1
            return read_loss(tally)

        def guarded_augment(self_, *args):
            if guard.armed:
                guard.switch(True)
            return augment(self_, *args)
        engine.optimizer_step, engine.agree, engine.DeviceTally.read_loss = (guarded_step, guarded_agree,
                                                                             guarded_read_loss)
        BatchAugment.__call__ = guarded_augment
        try:
            yield self
        finally:
            self.switch(False)
            engine.optimizer_step, engine.agree, engine.DeviceTally.read_loss = step, agree, read_loss
            BatchAugment.__call__ = augment


def steps_without_sync(ctx: Context, precision: str, compiled: bool, workers: int | None, batch: int, steps: int,
                       check_every: int) -> dict:
    """One warm-up epoch, then one epoch under SyncGuard; the first synchronising call, if any. `workers`:
    batches from a DataLoader with that many workers (pinned, as DATASET.loader dataloader), else the device
    loader."""
    trainer = Trainer(batch, ctx.env, steps, compiled, precision, check_every=check_every, workers=workers)
    trainer.epoch()
    guard = SyncGuard(ctx.cuda)
    error = None
    with guard.installed():
        try:
            trainer.epoch()
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            package = os.path.join(ROOT, "bsdist") + os.sep
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(package)][-2:]
            where = " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} ({f.line})" for f in frames)
            error = f"{str(e).strip().splitlines()[0][:200]}" + (f" at {where}" if where else "")
    return {**guard.counts, "error": error, "steps": steps, "batch": batch}


def check_no_host_sync(ctx: Context):
    variants = ({"compiled bf16": ("bf16", True, None), "compiled fp16": ("fp16", True, None),
                 "compiled bf16, DataLoader": ("bf16", True, 2)} if ctx.cuda
                else {"eager fp32": ("no", False, None), "eager fp32, DataLoader": ("no", False, 1)})
    size = dict(batch=32, steps=60, check_every=20) if ctx.cuda else dict(batch=8, steps=6, check_every=2)
    results = {name: steps_without_sync(ctx, precision, compiled, workers, **size)
               for name, (precision, compiled, workers) in variants.items()}
    counted = "; ".join(f"{name}: {r['steps_checked']} of {r['steps']} steps checked, {r['agree']} agreement and "
                        f"{r['read_loss']} loss reads with the mode off" for name, r in results.items())
    hooks_hit = all(r["steps_checked"] > 0 and r["agree"] > 0 and r["read_loss"] > 0 for r in results.values())
    require(hooks_hit, f"the guard's wrappers were not all called (engine's names changed?): {counted}", results)
    if not ctx.cuda:
        raise Skip(f"torch.cuda.set_sync_debug_mode needs CUDA; the same code path rehearsed on CPU ({counted})",
                   results)
    failed = {name: r["error"] for name, r in results.items() if r["error"]}
    require(not failed, f"a steady-state step synchronised with the host: {failed}", results)
    return f"no synchronising call inside the steps ({counted})", results
