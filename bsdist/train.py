"""main(cfg): the whole run, the same under python, torchrun and SLURM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from bsdist import checkpoint, config
from bsdist.config import Config
from bsdist.data import build_data
from bsdist.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_max,
    decided_by_main,
    every_rank_or_none,
    init_distributed,
    launched_as_main,
    main_process_first,
    set_collective_timeout,
    shutdown,
    sync_buffers_from_main,
)
from bsdist.engine import AMP_DTYPES, EpochProgress, TrainState, agree, evaluate, train_one_epoch
from bsdist.errors import BsdistError, PeerFailure, Stopped
from bsdist.losses import broadcast_class_prior, build_loss
from bsdist.metrics import describe_best
from bsdist.models import build_model
from bsdist.optim import build_optimizer, build_scheduler
from bsdist.output import BEST, make_output
from bsdist.rundir import Start, plan_start, resume_checkpoint, stage1_checkpoint


def main(cfg: Config) -> dict:
    """Train and evaluate as the validated cfg says; return the results written to results.json."""
    if launched_as_main():  # refuses a directory holding another run, or a stage 1 that does not fit, at once
        resume_checkpoint(cfg)
        stage1_checkpoint(cfg)
    device = config.check_device(cfg)  # on the machine that trains, SLURM nodes included
    env = init_distributed(device, cfg.TRAIN.dist_startup_timeout_s, cfg.TRAIN.dist_backend)
    out = make_output(env, config.run_dir(cfg))
    orderly = False  # every rank is alive and at the same point: leave together
    try:
        start = decided_by_main(env, lambda: plan_start(cfg))  # one view of the run directory: rank 0's
        if start.finished is not None:
            out.info(f"run already finished; results in {config.run_dir(cfg)}/results.json")
            results = start.finished
        else:
            with StopSignals() as signals:
                results = Trainer(cfg, env, out, start, signals).run()
        orderly = True
        return results
    except Stopped as e:
        # the others wait until rank 0 has written last.pt, so none is cut short (srun's kill-on-bad-exit)
        orderly = True
        out.info(str(e), console=False)  # the log tells why the run paused; the launcher prints the error
        raise
    except RuntimeError as e:
        # NCCL raises DistError, gloo RuntimeError
        if not (isinstance(e, dist.DistError) or "gloo/transport" in str(e)):
            raise
        raise PeerFailure(f"rank {env.rank}: a collective failed ({str(e).strip().splitlines()[0][:160]}): "
                          f"another process died or stopped answering within the collective timeout; the last "
                          f"checkpoint is kept, continue with TRAIN.resume auto") from None
    finally:
        _release_frames(sys.exc_info()[1])  # a failed run's model and DDP go now, not at interpreter exit
        out.close()
        shutdown(wait_for=env if orderly else None)


def agreed_precision(name: str, env: DistEnv) -> str:
    """TRAIN.mixed_precision resolved on this rank's device, the same on every rank: auto picks per GPU (bf16
    where it is native, else fp16), and ranks on different GPU models would average scaled fp16 gradients
    with unscaled bf16 ones. One all-reduce and one read at start-up, on every rank or none (the setting is
    the same everywhere)."""
    resolved = config.resolve_precision(name, env.device.type)
    if name != "auto" or env.world_size == 1:
        return resolved
    code = list(AMP_DTYPES).index(resolved)
    highest, lowest = all_reduce_max(torch.tensor([code, -code], device=env.device)).tolist()
    if highest != -lowest:
        raise BsdistError("TRAIN.mixed_precision auto chose bf16 on some ranks' GPUs and fp16 on others (different "
                          "GPU models); set TRAIN.mixed_precision fp16 (or bf16 where every GPU has it)")
    return resolved


def _release_frames(failure: BaseException | None) -> None:
    """Drop the local variables of the frames an exception (and those it arose from) still holds, so
    that the process group is not kept alive by them (see distributed.shutdown)."""
    seen = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        traceback.clear_frames(failure.__traceback__)
        failure = failure.__context__


def _position(epochs_done: int, step_in_epoch: int) -> str:
    """Where a checkpoint stands, in words."""
    return f"epoch {epochs_done + 1} step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epochs_done}"


class StopSignals:
    """SIGTERM / SIGINT / SIGUSR2 ask training to stop at the next check point with a checkpoint (a
    second SIGINT interrupts at once). The previous handlers come back afterwards: under SLURM that is
    submitit's USR2 handler, which then requeues the job (bsdist.slurm)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self):
        self.received = 0
        self.previous = {}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Trainer:
    """A run from its start to its results: what it builds, its epoch loop, and in state_dict() /
    load_state_dict() the one definition of what a checkpoint holds, so that saving and resuming cannot
    drift apart (tests/test_train.py round-trips them)."""

    def __init__(self, cfg: Config, env: DistEnv, out, start: Start, signals: StopSignals):
        t = cfg.TRAIN
        self.cfg, self.env, self.out, self.start, self.stage1 = cfg, env, out, start, start.stage1
        resuming = start.resume_from is not None
        torch.manual_seed(cfg.DEFAULT.seed)  # the same initial weights on every rank and for every world size
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every training and evaluation batch has one fixed shape
        self.data = build_data(cfg, env)
        self.num_per_cls = broadcast_class_prior(self.data.num_per_cls, env)
        self.compiled = t.compile is True or (t.compile == "auto" and env.device.type == "cuda")
        self.sync_bn, self.sync_bn_reason = config.resolve_sync_bn(cfg, env.world_size)
        with every_rank_or_none(env):  # a rank whose copy is not rank 0's says so, and every rank stops
            backbone = checkpoint.load(start.stage1, start.stage1_digest)["model"] if start.stage1_digest else None
        self.model = build_model(cfg, self.data.num_classes, self.data.in_channels, env.device, self.compiled,
                                 self.sync_bn, backbone, pretrained=not resuming)
        self.amp_dtype = AMP_DTYPES[agreed_precision(t.mixed_precision, env)]
        optimizer = build_optimizer(cfg, self.model.module)
        steps_per_epoch = -(-len(self.data.train) // t.grad_accum_steps)
        self.state = TrainState(self.model.train, build_loss(cfg.LOSS.name, self.num_per_cls).to(env.device), optimizer,
                                build_scheduler(cfg, optimizer, steps_per_epoch),
                                torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16),
                                self.amp_dtype,
                                t.grad_accum_steps, t.nonfinite, t.ckpt_every_steps, t.check_every_steps,
                                save=self.save, stop_requested=lambda: signals.received)
        self.signals = signals
        self.select_on = "val" if "val" in self.data.eval else "test"
        # where the run stands: epochs done, the position inside the next one, the selected and the last model
        self.epochs_done, self.progress, self.best, self.last = 0, EpochProgress(), None, None
        self.seconds_before, self.started_at = 0.0, time.perf_counter()

    def state_dict(self) -> dict:
        """Everything a resume needs to continue exactly from here (every rank calls it: the RNG states are
        gathered); config, num_per_cls and world_size are there for a reader, not restored."""
        s = self.state
        return {"model": self.model.module.state_dict(),  # the plain module: no DDP or compile prefixes
                "optimizer": s.optimizer.state_dict(), "lr_scheduler": s.scheduler.state_dict(),
                "scaler": s.scaler.state_dict(),
                "epoch": self.epochs_done, "progress": vars(self.progress), "step": s.step, "best": self.best,
                "last": self.last,
                "rng": all_gather_objects(checkpoint.rng_state(self.env.device)),
                "seconds": self.seconds_before + time.perf_counter() - self.started_at,
                "config": config.to_dict(self.cfg), "num_per_cls": self.num_per_cls, "world_size": self.env.world_size}

    def load_state_dict(self, ckpt: dict, source: str = "the checkpoint") -> None:
        """The mirror of state_dict: this trainer continues where the one that saved ckpt stood."""
        s = self.state
        try:
            self.model.module.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise BsdistError(f"{source} does not fit this model ({str(e).splitlines()[1].strip()[:120]}): "
                              "it comes from another run; move it away to start afresh, or resume the run it "
                              "belongs to") from None
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.scheduler.load_state_dict(ckpt["lr_scheduler"])
        s.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"], self.env.rank, self.env.device)
        self.epochs_done, self.progress, s.step = ckpt["epoch"], EpochProgress(**ckpt["progress"]), ckpt["step"]
        self.best, self.last = ckpt["best"], ckpt["last"]
        self.seconds_before, self.started_at = ckpt["seconds"], time.perf_counter()
        s.last_checkpoint = _position(self.epochs_done, self.progress.step)

    def save(self, epochs_done: int, at: EpochProgress, names=("last.pt",)) -> None:
        """A checkpoint of this point (inside an epoch, or at its end) under each of names, in the background."""
        self.epochs_done, self.progress = epochs_done, at
        self.out.save_checkpoint(self.state_dict(), list(names))
        self.state.last_checkpoint = _position(epochs_done, at.step)

    def run(self) -> dict:
        """Train from the start, or from the checkpoint rank 0 chose, to the last epoch; return the results."""
        cfg, env, out, t = self.cfg, self.env, self.out, self.cfg.TRAIN
        resume_from = self.start.resume_from and os.path.join(config.run_dir(cfg), self.start.resume_from)
        if resume_from:
            with every_rank_or_none(env):  # a rank whose copy is not rank 0's says so, and every rank stops
                saved = checkpoint.load(resume_from, self.start.resume_digest)
            self.load_state_dict(saved, f"checkpoint {resume_from}")
        # model, momentum, slack
        checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in self.model.module.parameters())
        with main_process_first(env):  # rank 0 makes the run directory; if it cannot, every rank stops
            out.start(cfg, self.state.step if resume_from else None, self.epochs_done, checkpoint_bytes)
        out.classes(self.num_per_cls, self.data.class_names, self.state.step)
        self._announce(resume_from)
        first_epoch = self.epochs_done
        for epoch in range(first_epoch, t.epochs):
            started = time.perf_counter()
            train_loss, train_acc = train_one_epoch(self.state, self.data, env, out, epoch, t.epochs, t.log_interval,
                                                    self.progress)
            improved = self._evaluate(epoch, train_loss, train_acc, started)
            self.save(epoch + 1, EpochProgress(), ["last.pt", "best.pt"] if improved else ["last.pt"])
            if epoch == first_epoch:
                set_collective_timeout(t.dist_timeout_s)  # start-up (downloads, compilation) is over
            if epoch + 1 == t.epochs:
                out.wait_for_checkpoints(raise_error=False)  # results.json only once the last checkpoint is on disk
            signum = int(agree(torch.zeros(0, dtype=torch.float64, device=env.device), self.signals.received, out)[-1])
            if signum and epoch + 1 < t.epochs:
                raise Stopped(f"stopped by signal {signum} after epoch {epoch + 1}; last.pt holds this point: "
                              "continue with TRAIN.resume auto", signum)
        results = {"best": self.best, "last": self.last, "num_per_cls": self.num_per_cls, "ckp_metric": t.ckp_metric,
                   "seconds": self.seconds_before + time.perf_counter() - self.started_at,
                   "stage1": os.path.abspath(os.path.dirname(self.stage1)) if self.stage1 else None}
        out.results(results)
        out.info(f"done: {describe_best(self.best)}; last test acc {self.last['acc']:.4f} bcr {self.last['bcr']:.4f}; "
                 f"results in {config.run_dir(cfg)}/results.json")
        return results

    def _announce(self, resume_from: str | None) -> None:
        cfg, out = self.cfg, self.out
        out.info(f"{self.env.world_size} process(es) on {self.env.device.type}; "
                 f"{len(self.data.train.dataset)} training images {list(self.num_per_cls)}; "
                 f"run directory {config.run_dir(cfg)}")
        if self.stage1:
            out.info(f"stage 2 (cRT) of {os.path.dirname(self.stage1)}: its selected model's backbone frozen, "
                     f"BatchNorm included; the classifier re-initialised and trained with {cfg.LOSS.name} and "
                     f"{cfg.DATASET.sampler.replace('_', '-')} sampling")
        else:
            out.info(f"BatchNorm {'synchronised across processes' if self.sync_bn else 'per process'}: "
                     f"{self.sync_bn_reason}")
        if self.select_on == "test":
            out.info("model selection (best.pt) uses the test set, as the published recipes do; "
                     "set DATASET.val_per_cls > 0 to select on a held-out validation split")
        if resume_from:
            out.info(f"resumed from {resume_from} at epoch {self.epochs_done + 1} step {self.progress.step} "
                     f"(global step {self.state.step})")

    def _evaluate(self, epoch: int, train_loss: float, train_acc: float, started: float) -> bool:
        """Evaluate every split after an epoch, select, log; whether the selected model improved."""
        t, out, step = self.cfg.TRAIN, self.out, self.state.step
        sync_buffers_from_main(self.model.module)  # ranks' BatchNorm statistics drift apart; evaluate and save rank 0's
        evaluated = {split: evaluate(self.model.compiled, loader, self.data.augment.normalize, self.data.num_classes,
                                     self.num_per_cls, self.env, self.amp_dtype,
                                     fixed_batch=loader.batch_sampler.batch_size if self.compiled else None)
                     for split, loader in self.data.eval.items()}
        self.last = {"epoch": epoch + 1, "selected_on": self.select_on, **evaluated["test"]}
        score = evaluated[self.select_on][t.ckp_metric]
        higher_is_better = t.ckp_metric != "loss"
        improved = self.best is None or (score > self.best["score"] if higher_is_better else score < self.best["score"])
        if improved:
            self.best = {"score": score, **self.last}
        for split, metrics in evaluated.items():
            out.eval_metrics(split, metrics, step)
        out.scalars({f"test/best_{k}": self.best[k] for k in BEST}, step)
        seconds = time.perf_counter() - started
        out.scalars({"train/epoch_acc": train_acc, "train/epoch_seconds": seconds}, step)
        out.epoch_row({"epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_acc": train_acc,
                       "lr": self.state.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                       **{f"{split}_{k}": m[k] for split, m in evaluated.items()
                          for k in ("loss", "acc", "bcr", "many", "medium", "few", "ece")}})
        out.info(f"epoch {epoch + 1}: "
                 + "  ".join(f"{split} acc {m['acc']:.4f} bcr {m['bcr']:.4f}" for split, m in evaluated.items())
                 + f"  best {self.select_on} {t.ckp_metric} {self.best['score']:.4f} (epoch {self.best['epoch']})")
        return improved

