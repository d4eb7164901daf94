"""The Trainer: the whole training loop in one place, fit() -> train_epoch() -> train_step(), with the
sync points where the ranks agree; called identically by every rank."""

from __future__ import annotations

import itertools
import os
import time

import torch

from bsdist import checkpoint, config
from bsdist.config import Config
from bsdist.data import Data, build_data
from bsdist.distributed import DistEnv, all_gather_objects, every_rank_or_none, main_process_first, rank_max,\
    set_collective_timeout, sync_buffers_from_main
from bsdist.evaluation import evaluate
from bsdist.errors import BsdistError, Stopped
from bsdist.losses import Loss, build_loss
from bsdist.metrics import describe_best
from bsdist.method import MethodContext, broadcast_class_prior
from bsdist.models import Model, build_model, classifier, grads_in_buckets, no_sync
from bsdist.optim import RunningStats, build_optimizer, build_scheduler, optimizer_step
from bsdist.runtime import Runtime, resolve_runtime
from bsdist.rundir import Start
from bsdist.runlog import announce, describe_step, duration, nonfinite_stop, position, record_epoch
from bsdist.tally import DeviceTally, EpochProgress


class Trainer:
    """A run from its start to its results: what it builds, its loop, and in state_dict() /
    load_state_dict() the one definition of what a checkpoint holds, so that saving and resuming cannot
    drift apart (tests/test_train.py round-trips them)."""

    # given
    cfg: Config
    env: DistEnv  # this process in its group
    out: object  # rank 0's files and lines (RunOutput); a do-nothing NullOutput on the other ranks
    plan: Start  # how the run starts, as rank 0 read its directory: the checkpoint it resumes, stage 1's, digests
    stage1: str | None  # a stage 2's stage-1 checkpoint (cRT), or None
    signals: object  # StopSignals: the signal asking to stop (read at sync points), or 0
    # built
    data: Data  # the training loader and sampler, the evaluation loaders, the batch augmentation
    runtime: Runtime  # device, agreed precision, compile, sync BN, backend, loader: resolved once
    num_per_cls: list[int]  # rank 0's training images per class, checked on every rank
    model: Model  # .module (checkpointed), .compiled (evaluated), .wrapped (trained: compiled, DDP-wrapped)
    method: MethodContext  # what the loss (and any method) reads: counts, prior, head, epoch, step
    loss: Loss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped per optimiser step
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    running_stats: RunningStats | None  # BatchNorm statistics a skipped step puts back (TRAIN.nonfinite skip)
    steps_per_epoch: int  # optimiser steps
    select_on: str  # the split that selects best.pt: val where there is one, else test
    tally: DeviceTally  # the epoch's sums and non-finite flags, on the device between sync points
    # where the run stands (with method.step, what a checkpoint holds besides the weights)
    epochs_done: int
    progress: EpochProgress  # the position inside the next epoch (a mid-epoch checkpoint's)
    best: dict | None  # the selected model's metrics
    last: dict | None  # the last epoch's test metrics
    seconds_before: float  # training time of the attempts before this one
    started_at: float
    last_checkpoint: str  # where the last checkpoint written stands ("epoch 2 step 40"), for messages
    lr: float  # the rate the last optimiser step used: what the log line, train/lr and metrics.csv give
    # the log line's clock: when this epoch's training (or its resumed part) started, from which step, last read
    epoch_started: float
    first_step: int
    last_read: float

    def __init__(self, cfg: Config, env: DistEnv, out, plan: Start, signals):
        t, resuming = cfg.TRAIN, plan.resume_from is not None
        self.cfg, self.env, self.out, self.plan, self.stage1, self.signals = cfg, env, out, plan, plan.stage1, signals
        torch.manual_seed(cfg.DEFAULT.seed)  # the same initial weights on every rank and for every world size
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every training and evaluation batch has one fixed shape
        self.data = build_data(cfg, env)
        self.num_per_cls = broadcast_class_prior(self.data.num_per_cls, env)
        self.runtime = rt = resolve_runtime(cfg, env, self.data.train)
        with every_rank_or_none(env):  # a rank whose copy is not rank 0's says so, and every rank stops
            backbone = checkpoint.load(plan.stage1, plan.stage1_digest)["model"] if plan.stage1_digest else None
        self.model = build_model(cfg, self.data.num_classes, self.data.in_channels, env.device, rt.compile,
                                 rt.sync_bn, backbone, pretrained=not resuming)
        self.method = MethodContext.of(self.num_per_cls, lambda: classifier(self.model.module), env.device)
        self.loss = build_loss(cfg.LOSS, self.method)
        self.optimizer = build_optimizer(cfg, self.model.module)
        self.steps_per_epoch = -(-len(self.data.train) // t.grad_accum_steps)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=rt.precision == "fp16")
        self.running_stats = RunningStats(self.model.wrapped) if t.nonfinite == "skip" else None
        self.select_on = "val" if "val" in self.data.eval else "test"
        self.epochs_done, self.progress, self.best, self.last = 0, EpochProgress(), None, None
        self.seconds_before, self.started_at, self.last_checkpoint = 0.0, time.perf_counter(), ""
        self.lr = self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """Everything a resume needs to continue exactly from here (every rank calls it: the RNG states are
        gathered); config, num_per_cls and world_size are there for a reader, not restored."""
        return {"model": self.model.module.state_dict(),  # the plain module: no DDP or compile prefixes
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epochs_done, "progress": vars(self.progress), "step": self.method.step,
                "best": self.best, "last": self.last,
                "rng": all_gather_objects(checkpoint.rng_state(self.env.device)),
                "seconds": self.seconds_before + time.perf_counter() - self.started_at,
                "config": config.to_dict(self.cfg), "num_per_cls": self.num_per_cls, "world_size": self.env.world_size}

    def load_state_dict(self, ckpt: dict, source: str = "the checkpoint") -> None:
        """The mirror of state_dict: this trainer continues where the one that saved ckpt stood."""
        try:
            self.model.module.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise BsdistError(f"{source} does not fit this model ({str(e).splitlines()[1].strip()[:120]}): "
                              "it comes from another run; move it away to start afresh, or resume the run it "
                              "belongs to") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"], self.env.rank, self.env.device)
        self.epochs_done, self.progress = ckpt["epoch"], EpochProgress(**ckpt["progress"])
        self.method.step = ckpt["step"]
        self.best, self.last = ckpt["best"], ckpt["last"]
        self.seconds_before, self.started_at = ckpt["seconds"], time.perf_counter()
        self.last_checkpoint = position(self.epochs_done, self.progress.step)

    def save(self, epochs_done: int, at: EpochProgress, names=("last.pt",)) -> None:
        """A checkpoint of this point (inside an epoch, or at its end) under each of names, in the background."""
        self.epochs_done, self.progress = epochs_done, at
        self.out.save_checkpoint(self.state_dict(), list(names))
        self.last_checkpoint = position(epochs_done, at.step)

    def fit(self) -> dict:
        """Train from the start, or from the checkpoint rank 0 chose, to the last epoch; return the results."""
        t = self.cfg.TRAIN
        resume_from = self.plan.resume_from and os.path.join(config.run_dir(self.cfg), self.plan.resume_from)
        if resume_from:
            with every_rank_or_none(self.env):  # a rank whose copy is not rank 0's says so, and every rank stops
                saved = checkpoint.load(resume_from, self.plan.resume_digest)
            self.load_state_dict(saved, f"checkpoint {resume_from}")
        self.start(resume_from)
        first_epoch = self.epochs_done
        for epoch in range(first_epoch, t.epochs):
            started = time.perf_counter()
            train_loss, train_acc = self.train_epoch(epoch)
            improved = self.evaluate_epoch(epoch, train_loss, train_acc, started)
            self.save(epoch + 1, EpochProgress(), ["last.pt", "best.pt"] if improved else ["last.pt"])
            if epoch == first_epoch:
                set_collective_timeout(t.dist_timeout_s)  # start-up (downloads, compilation) is over
            if epoch + 1 == t.epochs:
                self.out.wait_for_checkpoints(raise_error=False)  # results.json once the last checkpoint is on disk
            signum = self.sync_point()  # a signal that came during evaluation; the epoch-end checkpoint's write
            if signum and epoch + 1 < t.epochs:
                raise Stopped(f"stopped by signal {signum} after epoch {epoch + 1}; last.pt holds this point: "
                              "continue with TRAIN.resume auto", signum)
        return self.finish()

    def start(self, resume_from: str | None) -> None:
        """The run directory (rank 0 makes it; if it cannot, every rank stops), its records and first lines."""
        checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in self.model.module.parameters())  # model,
        with main_process_first(self.env):  # momentum, slack
            self.out.start(self.cfg, self.method.step if resume_from else None, self.epochs_done, checkpoint_bytes)
        self.out.write_json("runtime.json", self.runtime.to_dict())
        self.out.classes(self.num_per_cls, self.data.class_names, self.method.step)
        announce(self, resume_from)

    def evaluate_epoch(self, epoch: int, train_loss: float, train_acc: float, started: float) -> bool:
        """Evaluate every split after an epoch, select, record; whether the selected model improved."""
        metric = self.cfg.TRAIN.ckp_metric
        sync_buffers_from_main(self.model.module)  # ranks' BatchNorm statistics drift apart; evaluate and save rank 0's
        evaluated = {split: evaluate(self.model.compiled, loader, self.data.augment.normalize, self.data.num_classes,
                                     self.num_per_cls, self.runtime,
                                     fixed_batch=loader.batch_sampler.batch_size if self.runtime.compile else None)
                     for split, loader in self.data.eval.items()}
        self.last = {"epoch": epoch + 1, "selected_on": self.select_on, **evaluated["test"]}
        score = evaluated[self.select_on][metric]
        improved = self.best is None or (score < self.best["score"] if metric == "loss" else score > self.best["score"])
        if improved:
            self.best = {"score": score, **self.last}
        record_epoch(self.out, epoch, self.method.step, evaluated, self.best, self.select_on, metric,
                     {"loss": train_loss, "acc": train_acc, "lr": self.lr,
                      "seconds": time.perf_counter() - started})
        return improved

    def finish(self) -> dict:
        """results.json: the selected and the last model's metrics."""
        results = {"best": self.best, "last": self.last, "num_per_cls": self.num_per_cls,
                   "ckp_metric": self.cfg.TRAIN.ckp_metric,
                   "seconds": self.seconds_before + time.perf_counter() - self.started_at,
                   "stage1": os.path.abspath(os.path.dirname(self.stage1)) if self.stage1 else None}
        self.out.results(results)
        self.out.info(f"done: {describe_best(self.best)}; last test acc {self.last['acc']:.4f} bcr "
                      f"{self.last['bcr']:.4f}; results in {config.run_dir(self.cfg)}/results.json")
        return results

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Train one epoch (from self.progress when resuming inside it); return the mean loss and accuracy
        over all ranks' images.

        The host never waits for the device inside a step. A step with a non-finite loss on any rank is
        skipped on the device by every rank; the host learns of it, and of stop signals, at the next sync
        point (every TRAIN.check_every_steps steps, every log point, every checkpoint, the epoch's end),
        where all ranks stop, skip or checkpoint together. No checkpoint is written between a non-finite
        step and that sync point.
        """
        t, loader = self.cfg.TRAIN, self.data.train
        self.model.wrapped.train()
        self.data.train_sampler.set_epoch(epoch)
        self.data.augment.set_epoch(epoch)
        self.method.epoch = epoch
        num_micro, first = len(loader), self.progress.step
        loader.batch_sampler.start = first * t.grad_accum_steps  # skip what the checkpoint already trained
        self.tally = DeviceTally(self.env.device, self.progress)
        self.epoch_started = self.last_read = time.perf_counter()
        self.first_step = first
        micro_batches = iter(loader)
        for step_in_epoch in range(first + 1, self.steps_per_epoch + 1):
            group_size = min(t.grad_accum_steps, num_micro - (step_in_epoch - 1) * t.grad_accum_steps)
            self.train_step(itertools.islice(micro_batches, group_size), group_size)
            mid_epoch = step_in_epoch < self.steps_per_epoch
            checkpoint_due = bool(mid_epoch and t.ckpt_every_steps and step_in_epoch % t.ckpt_every_steps == 0)
            log_due = step_in_epoch % t.log_interval == 0 or not mid_epoch
            if not (log_due or checkpoint_due or step_in_epoch % t.check_every_steps == 0):
                continue
            signum = self.sync_point()
            checkpoint_due = checkpoint_due or bool(signum and mid_epoch)
            if log_due or checkpoint_due:
                self.log_progress(step_in_epoch)
            if checkpoint_due:
                self.save(epoch, self.tally.progress(step_in_epoch))
            if signum and mid_epoch:
                raise Stopped(f"stopped by signal {signum} at epoch {epoch + 1} step {step_in_epoch}; last.pt holds "
                              "this point: continue with TRAIN.resume auto", signum)
        return self.tally.epoch_means()

    def train_step(self, micro_batches, group_size: int) -> None:
        """One optimiser step over group_size micro-batches (skipped on the device where any rank's loss was
        non-finite); self.lr is the learning rate it used."""
        if self.running_stats is not None:
            self.running_stats.save()  # as they stand before the step's first micro-batch
        for i, batch in enumerate(micro_batches):
            self.forward_backward(batch, group_size, last_of_group=i == group_size - 1)
        self.lr = self.optimizer.param_groups[0]["lr"]  # before the scheduler steps: this step's rate
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # the norm of the true gradients; scaler.step knows they are unscaled
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        skip = self.tally.end_step(self.method.step + 1, torch.nn.utils.get_total_norm(grads))
        if self.running_stats is not None:
            self.running_stats.restore_if(skip)
        optimizer_step(self.optimizer, self.scaler, skip)
        self.optimizer.zero_grad(set_to_none=not grads_in_buckets(self.model.wrapped))
        self.scheduler.step()
        self.method.step_done()

    def forward_backward(self, batch, group_size: int, last_of_group: bool) -> None:
        """Forward and backward of one micro-batch; DDP all-reduces only on the last of its group."""
        images, targets, indices = batch
        device = self.env.device
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        indices = indices.to(device, non_blocking=True)  # pinned by a DataLoader: a blocking copy would wait
        inputs = self.data.augment(images, indices)
        with no_sync(self.model.wrapped, last_of_group):
            with self.runtime.autocast():
                logits = self.model.wrapped(inputs)
            loss = self.loss(logits, targets)
            self.scaler.scale(loss / group_size).backward()
        self.tally.add(loss, logits, targets)

    def sync_point(self) -> int:
        """Where the ranks agree, with one all-reduce and one host read: every rank stops if rank 0 could not
        write a checkpoint, stops or skips on non-finite steps since the last sync point, and learns the
        stop signal any rank received (returned, 0 for none)."""
        bad, first_bad, signum, write_failed = rank_max(self.env.device, self.signals.received,
                                                        float(bool(self.out.checkpoint_failed())),
                                                        on_device=self.tally.flags)
        self.tally.clear_flags()
        if write_failed:
            self.out.wait_for_checkpoints()  # rank 0 raises its write's error
            raise BsdistError("rank 0 could not write a checkpoint; its message says why")
        if bad:
            where = describe_step(int(first_bad), self.steps_per_epoch)
            if self.cfg.TRAIN.nonfinite == "stop":
                raise BsdistError(nonfinite_stop(where, self.last_checkpoint))
            self.out.info(f"{int(bad)} step(s) with a non-finite loss on some rank skipped, the first at {where} "
                          "(TRAIN.nonfinite skip)")
        return int(signum)

    def log_progress(self, step_in_epoch: int) -> None:
        """The log line and the train/ scalars since the last one (waits for the device: the clock reads after)."""
        loss_mean, accuracy, images_seen, grad_norm = self.tally.read_loss()
        now, epochs, steps = time.perf_counter(), self.cfg.TRAIN.epochs, self.steps_per_epoch
        rate = images_seen / (now - self.last_read)
        remaining = (epochs - self.method.epoch) * steps - step_in_epoch
        eta = (now - self.epoch_started) / (step_in_epoch - self.first_step) * remaining
        self.out.info(f"epoch {self.method.epoch + 1}/{epochs} step {step_in_epoch}/{steps} loss {loss_mean:.4f} "
                      f"lr {self.lr:.5f} {rate:.0f} img/s eta {duration(eta)}")
        self.out.scalars({"train/loss": loss_mean, "train/acc": accuracy, "train/lr": self.lr, "train/img_per_s": rate,
                          "train/grad_norm": grad_norm}, self.method.step)
        self.last_read = now
