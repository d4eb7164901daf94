"""Training steps timed: the reference style (its DataLoader, eager fp32 ResNet-18) and bsdist's, built as a
run builds it and trained through bsdist's Trainer, at one batch size and precision."""

from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass
from unittest import mock

import torch

from timing.data_path import bsdist_data, cifar_shaped_digits, images_per_second, reference_loader, sync

from bsdist import config
from bsdist import trainer as trainer_module
from bsdist.data import Data, DeviceLoader, ResumableBatchSampler
from bsdist.data.datasets import ImageArrays
from bsdist.evaluation import evaluate
from bsdist.models import resnet18
from bsdist.output import NullOutput
from bsdist.rundir import Start
from bsdist.trainer import Trainer


def bench_reference_training(batch_size, device, steps):
    data, targets = cifar_shaped_digits(batch_size * (steps + 1))
    model = resnet18(10, 3).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    it = iter(reference_loader(data, targets, batch_size))

    def step():
        images, y = next(it)
        loss = loss_fn(model(images.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return images_per_second(steps * batch_size, time.perf_counter() - t0)


def bench_config(batch_size: int, precision: str, env, sync_bn: bool = False, overrides=(),
                 compile_model=False) -> config.Config:
    """The default config at a per-process batch, precision, compilation and SyncBatchNorm setting, with no log
    line or checkpoint inside an epoch (and `KEY.SUB value` overrides)."""
    return config.validate(config.load(None, [
        "DATASET.batch_size", str(batch_size * env.world_size), "TRAIN.mixed_precision", precision,
        "TRAIN.device", env.device.type, "TRAIN.compile", str(compile_model).lower(),
        "MODEL.sync_bn", str(sync_bn).lower(), "TRAIN.log_interval", str(10**9),
        "TRAIN.ckpt_every_steps", "0", *overrides]), env.world_size)


def bsdist_trainer(cfg, env, data: Data, build=None) -> Trainer:
    """bsdist's Trainer, built from cfg as a run builds it, on the benchmark's `data` in place of the dataset's,
    and on the Model `build` returns (called as build_model is) where given."""
    replaced = {"build_data": lambda cfg, env: data, **({"build_model": build} if build else {})}
    with contextlib.ExitStack() as stack:
        for name, value in replaced.items():
            stack.enter_context(mock.patch.object(trainer_module, name, value))
        return Trainer(cfg, env, NullOutput(), Start(), types.SimpleNamespace(received=0))


def timed_epoch(trainer: Trainer, epoch: int) -> tuple[float, int]:
    """Train one epoch through Trainer.train_epoch; its seconds (the device synchronised) and optimiser steps."""
    sync(trainer.env.device)
    before, t0 = trainer.method.step, time.perf_counter()
    trainer.train_epoch(epoch)
    sync(trainer.env.device)
    return time.perf_counter() - t0, trainer.method.step - before


def model_overrides(model: str, image_size: int) -> list[str]:
    """MODEL.name and the stem a run on images of that size gets (config's MODEL.stem auto)."""
    return ["MODEL.name", model, "MODEL.stem", "imagenet" if image_size > 64 else "cifar"]


class TimedTrainer:
    """bsdist's Trainer, built as a run builds it, training on digits; timed.

    `batch_size` is per process; an epoch is `steps` optimiser steps of the device loader; `model` one of
    MODEL.name's choices, on digits scaled to `image_size` pixels. Dynamo is reset first, so a compiled
    one compiles its own graphs (none left from an earlier batch size or precision).
    """

    def __init__(self, batch_size, env, steps, compile_model, precision, model="resnet18", image_size=32):
        torch._dynamo.reset()
        self.env, self.batch_size, self.steps = env, batch_size, steps
        self.started = time.perf_counter()
        self.first_step_at: float | None = None  # time.time() at the end of the first optimiser step
        self.first_step_s: float | None = None  # seconds from self.started to then
        cfg = bench_config(batch_size, precision, env, overrides=model_overrides(model, image_size),
                           compile_model=compile_model)
        images = batch_size * env.world_size
        data, targets = cifar_shaped_digits(images * steps, image_size)
        if len(set(targets.tolist())) < 10:
            raise ValueError(f"{images * steps} images do not hold every digit class; "
                             "raise the batch size or the steps")
        shard = bsdist_data(data, targets, batch_size, env.device, world_size=env.world_size, rank=env.rank)
        self.trainer = bsdist_trainer(cfg, env, shard)
        self.trainer.method.on_step(self._first_step_done)
        self.epochs_run = 0

    def _first_step_done(self, method) -> None:
        if self.first_step_at is None:
            sync(self.env.device)  # once, outside the timed epochs
            self.first_step_at = time.time()
            self.first_step_s = time.perf_counter() - self.started

    def epoch(self) -> tuple[float, int]:
        """Train one epoch; return its seconds and optimiser steps."""
        seconds, steps = timed_epoch(self.trainer, self.epochs_run)
        self.epochs_run += 1
        return seconds, steps

    def first_step(self) -> float:
        """The first epoch, which warms everything up (compilation, autotuning, allocator); the seconds from the
        start of building the model to the end of its first step."""
        if self.first_step_at is None:
            self.epoch()
        return self.first_step_s

    def timed_rate(self) -> tuple[float, int]:
        """Images/s over all processes of one steady epoch, after a warm one (autotuning, allocator, recompiles)."""
        if not self.epochs_run:
            self.epoch()
        seconds, steps = self.epoch()
        assert steps == self.steps, f"timed {steps} steps, asked for {self.steps}"
        return images_per_second(steps * self.batch_size * self.env.world_size, seconds), steps

    def evaluate(self, batches: int, test_batch: int) -> tuple[float, int]:
        """Seconds and images of one evaluation of `batches` x `test_batch` images through the real evaluate."""
        n, trainer = batches * test_batch, self.trainer
        data, targets = cifar_shaped_digits(n)
        loader = DeviceLoader(ImageArrays(data, targets), ResumableBatchSampler(range(n), test_batch, False),
                              self.env.device)
        sync(self.env.device)
        t0 = time.perf_counter()
        evaluate(trainer.model.compiled, loader, trainer.data.augment.normalize, 10, [1] * 10, trainer.runtime,
                 test_batch if trainer.runtime.compile else None)
        sync(self.env.device)
        return time.perf_counter() - t0, n


@dataclass
class TrainingRate:
    precision: str
    compiled: bool
    batch_size: int
    img_per_s: float
    timed_steps: int
    time_to_first_step_s: float


def bench_bsdist_training(batch_size, env, steps, compile_model, precision) -> TrainingRate:
    """Time to the first step and steady images/s of bsdist's training at one setting."""
    trainer = TimedTrainer(batch_size, env, steps, compile_model, precision)
    first = trainer.first_step()
    rate, timed = trainer.timed_rate()
    return TrainingRate(precision, compile_model, batch_size, rate, timed, first)
