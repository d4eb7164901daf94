"""Training steps timed: the reference style (its DataLoader, eager fp32 ResNet-18) and bsdist's, built as a
run builds it and trained through the real train_one_epoch (Trainer), at one batch size and precision."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from timing.data_path import bsdist_data, cifar_shaped_digits, images_per_second, reference_loader, sync

from bsdist import config
from bsdist.data import Data, DeviceLoader, ResumableBatchSampler
from bsdist.data.datasets import ImageArrays
from bsdist.engine import AMP_DTYPES, TrainState, evaluate, train_one_epoch
from bsdist.losses import BalancedSoftmax
from bsdist.models import build_model, resnet18
from bsdist.optim import build_optimizer, build_scheduler
from bsdist.output import NullOutput


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


def bench_config(batch_size: int, precision: str, env, sync_bn: bool = False, overrides=()) -> config.Config:
    """The default config at a per-process batch, precision and SyncBatchNorm setting (and `KEY.SUB value`
    overrides)."""
    return config.validate(config.load(None, [
        "DATASET.batch_size", str(batch_size * env.world_size), "TRAIN.mixed_precision", precision,
        "TRAIN.device", env.device.type, "MODEL.sync_bn", str(sync_bn).lower(), *overrides]), env.world_size)


def train_state(cfg, module, runnable, data, env, steps_per_epoch, check_every=20):
    """What train_one_epoch needs, as bsdist's run builds it: the config's optimiser and schedule, Balanced Softmax.
    `module` is the plain model (the optimiser's parameters), `runnable` what training calls."""
    optimizer = build_optimizer(cfg, module)
    amp = AMP_DTYPES[config.resolve_precision(cfg.TRAIN.mixed_precision, env.device.type)]
    return TrainState(runnable, BalancedSoftmax(list(data.num_per_cls.values())).to(env.device), optimizer,
                      build_scheduler(cfg, optimizer, steps_per_epoch),
                      torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16), amp,
                      cfg.TRAIN.grad_accum_steps, check_every=check_every)


def model_overrides(model: str, image_size: int) -> list[str]:
    """MODEL.name and the stem a run on images of that size gets (config's MODEL.stem auto)."""
    return ["MODEL.name", model, "MODEL.stem", "imagenet" if image_size > 64 else "cifar"]


class Trainer:
    """A model built as a run builds it (build_model), training on digits through the real train_one_epoch.

    `batch_size` is per process; an epoch is `steps` optimiser steps of the device loader; `model` one of
    MODEL.name's choices, on digits scaled to `image_size` pixels. Dynamo is reset first, so a compiled
    Trainer compiles its own graphs (none left from an earlier batch size or precision).
    """

    def __init__(self, batch_size, env, steps, compile_model, precision, check_every=20, model="resnet18",
                 image_size=32):
        torch._dynamo.reset()
        self.env, self.batch_size, self.steps, self.compiled = env, batch_size, steps, compile_model
        self.started = time.perf_counter()
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as a run sets it (bsdist/train.py)
        self.cfg = bench_config(batch_size, precision, env, overrides=model_overrides(model, image_size))
        self.built = build_model(self.cfg, num_classes=10, in_channels=3, device=env.device,
                                 compile_model=compile_model)
        images = batch_size * env.world_size
        data, targets = cifar_shaped_digits(images * steps, image_size)
        if len(set(targets.tolist())) < 10:
            raise ValueError(f"{images * steps} images do not hold every digit class; "
                             "raise the batch size or the steps")
        shard = dict(world_size=env.world_size, rank=env.rank)
        self.data = bsdist_data(data, targets, batch_size, env.device, **shard)
        self.one_step = bsdist_data(data[:images], targets[:images], batch_size, env.device, **shard)
        self.state = train_state(self.cfg, self.built.module, self.built.wrapped, self.data, env, steps, check_every)
        self.epochs_run = 0

    def epoch(self, data: Data | None = None) -> tuple[float, int]:
        """Train one epoch (of `data`, else the `steps`-step one); return its seconds and optimiser steps."""
        sync(self.env.device)
        before, t0 = self.state.step, time.perf_counter()
        train_one_epoch(self.state, data or self.data, self.env, NullOutput(), self.epochs_run, self.epochs_run + 1,
                        10**9)
        sync(self.env.device)
        self.epochs_run += 1
        return time.perf_counter() - t0, self.state.step - before

    def first_step(self) -> float:
        """One step; the seconds from the start of building the model (compilation included) to its end."""
        self.epoch(self.one_step)
        return time.perf_counter() - self.started

    def timed_rate(self) -> tuple[float, int]:
        """Images/s over all processes of one steady epoch, after a warm one (autotuning, allocator, recompiles)."""
        self.epoch()
        seconds, steps = self.epoch()
        assert steps == self.steps, f"timed {steps} steps, asked for {self.steps}"
        return images_per_second(steps * self.batch_size * self.env.world_size, seconds), steps

    def evaluate(self, batches: int, test_batch: int) -> tuple[float, int]:
        """Seconds and images of one evaluation of `batches` x `test_batch` images through the real evaluate."""
        n = batches * test_batch
        data, targets = cifar_shaped_digits(n)
        loader = DeviceLoader(ImageArrays(data, targets), ResumableBatchSampler(range(n), test_batch, False),
                              self.env.device)
        sync(self.env.device)
        t0 = time.perf_counter()
        evaluate(self.built.compiled, loader, self.data.augment.normalize, 10, [1] * 10, self.env, self.state.amp_dtype,
                 test_batch if self.compiled else None)
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
    trainer = Trainer(batch_size, env, steps, compile_model, precision)
    first = trainer.first_step()
    rate, timed = trainer.timed_rate()
    return TrainingRate(precision, compile_model, batch_size, rate, timed, first)
