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
from bsdist.rundir import finished_results, resume_checkpoint, stage1_checkpoint
from bsdist.data import build_data
from bsdist.distributed import (DistEnv, all_gather_objects, init_distributed, main_process_first, set_collective_timeout,
                                shutdown, sync_buffers_from_main)
from bsdist.engine import AMP_DTYPES, EpochProgress, TrainState, agree, evaluate, train_one_epoch
from bsdist.errors import BsdistError, PeerFailure, Stopped
from bsdist.losses import broadcast_class_prior, build_loss
from bsdist.metrics import describe_best
from bsdist.models import build_model
from bsdist.optim import build_optimizer, build_scheduler
from bsdist.output import BEST, make_output



def main(cfg: dict) -> dict:
    """Train and evaluate as the validated cfg says; return the results written to results.json."""
    resume_from = resume_checkpoint(cfg)  # refuses a directory holding another run before anything happens
    stage1 = stage1_checkpoint(cfg)  # a stage 2's stage-1 run, finished and fitting this one
    device = config.check_device(cfg)  # on the machine that trains, SLURM nodes included
    env = init_distributed(device, cfg["TRAIN"]["dist_startup_timeout_s"], cfg["TRAIN"]["dist_backend"])
    out = make_output(env, config.run_dir(cfg))
    orderly = False  # every rank is alive and at the same point: leave together
    try:
        finished = finished_results(cfg)
        if finished is not None:
            out.info(f"run already finished; results in {config.run_dir(cfg)}/results.json")
            results = finished
        else:
            with StopSignals() as signals:
                results = _run(cfg, env, out, resume_from, stage1, signals)
        orderly = True
        return results
    except Stopped as e:
        orderly = True  # the others wait until rank 0 has written last.pt, so none is cut short (srun's kill-on-bad-exit)
        out.info(str(e), console=False)  # the log tells why the run paused; the launcher prints the error
        raise
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or "gloo/transport" in str(e)):  # NCCL raises DistError, gloo RuntimeError
            raise
        raise PeerFailure(f"rank {env.rank}: a collective failed ({str(e).strip().splitlines()[0][:160]}): another process died "
                          f"or stopped answering within the collective timeout; the last checkpoint is kept, continue "
                          f"with TRAIN.resume auto") from None
    finally:
        _release_frames(sys.exc_info()[1])  # a failed run's model and DDP go now, not at interpreter exit
        out.close()
        shutdown(wait_for=env if orderly else None)


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


def _run(cfg: dict, env: DistEnv, out, resume_from: str | None, stage1: str | None, signals: StopSignals) -> dict:
    t, seed = cfg["TRAIN"], cfg["DEFAULT"]["seed"]
    torch.manual_seed(seed)  # the same initial weights on every rank and for every world size
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every training and evaluation batch has one fixed shape
    data = build_data(cfg, env)
    num_per_cls = broadcast_class_prior(data.num_per_cls, env)
    compile_model = t["compile"] is True or (t["compile"] == "auto" and env.device.type == "cuda")
    sync_bn, sync_bn_reason = config.resolve_sync_bn(cfg, env.world_size)
    backbone = checkpoint.load(stage1)["model"] if stage1 and not resume_from else None  # a resume has its own weights
    model = build_model(cfg, data.num_classes, data.in_channels, env.device, compile_model, sync_bn, backbone,
                        pretrained=resume_from is None)  # a resume loads its own weights
    amp_dtype = AMP_DTYPES[config.resolve_precision(t["mixed_precision"], env.device.type)]
    optimizer = build_optimizer(cfg, model.module)
    steps_per_epoch = -(-len(data.train) // t["grad_accum_steps"])
    state = TrainState(model.train, build_loss(cfg["LOSS"]["name"], num_per_cls).to(env.device), optimizer,
                       build_scheduler(cfg, optimizer, steps_per_epoch),
                       torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16), amp_dtype,
                       t["grad_accum_steps"], t["nonfinite"], t["ckpt_every_steps"], t["check_every_steps"],
                       stop_requested=lambda: signals.received)
    start_epoch, progress, best, last, seconds_before = 0, EpochProgress(), None, None, 0.0
    if resume_from:
        ckpt = checkpoint.load(resume_from)
        try:
            model.module.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise BsdistError(f"checkpoint {resume_from} does not fit this model ({str(e).splitlines()[1].strip()[:120]}): it comes from "
                              "another run; move it away to start afresh, or resume the run it belongs to") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["lr_scheduler"])
        state.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"], env.rank, env.device)
        start_epoch, state.step, seconds_before = ckpt["epoch"], ckpt["step"], ckpt["seconds"]
        progress, best, last = EpochProgress(**ckpt["progress"]), ckpt["best"], ckpt["last"]
    checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in model.module.parameters())  # model, momentum, slack
    with main_process_first(env):  # rank 0 makes the run directory; if it cannot, every rank stops
        out.start(cfg, state.step if resume_from else None, start_epoch, checkpoint_bytes)
    out.classes(num_per_cls, data.class_names, state.step)
    select_on = "val" if "val" in data.eval else "test"
    out.info(f"{env.world_size} process(es) on {env.device.type}; {len(data.train.dataset)} training images "
             f"{list(num_per_cls)}; run directory {config.run_dir(cfg)}")
    if stage1:
        out.info(f"stage 2 (cRT) of {os.path.dirname(stage1)}: its selected model's backbone frozen, BatchNorm "
                 f"included; the classifier re-initialised and trained with {cfg['LOSS']['name']} and "
                 f"{cfg['DATASET']['sampler'].replace('_', '-')} sampling")
    else:
        out.info(f"BatchNorm {'synchronised across processes' if sync_bn else 'per process'}: {sync_bn_reason}")
    if select_on == "test":
        out.info("model selection (best.pt) uses the test set, as the published recipes do; "
                 "set DATASET.val_per_cls > 0 to select on a held-out validation split")
    if resume_from:
        out.info(f"resumed from {resume_from} at epoch {start_epoch + 1} step {progress.step} (global step {state.step})")
    started_at = time.perf_counter()

    def snapshot(epochs_done: int, at: EpochProgress) -> dict:
        """Everything a resume needs to continue exactly from here (every rank calls it: the RNG states are gathered)."""
        return {"model": model.module.state_dict(),  # the plain module: no DDP or compile prefixes
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                "epoch": epochs_done, "progress": vars(at), "step": state.step, "best": best, "last": last,
                "rng": all_gather_objects(checkpoint.rng_state(env.device)),
                "seconds": seconds_before + time.perf_counter() - started_at,
                "config": cfg, "num_per_cls": num_per_cls, "world_size": env.world_size}

    def save(epochs_done: int, at: EpochProgress, names=("last.pt",)) -> None:
        out.save_checkpoint(snapshot(epochs_done, at), list(names))
        state.last_checkpoint = _position(epochs_done, at.step)

    state.save = save
    if resume_from:
        state.last_checkpoint = _position(start_epoch, progress.step)
    higher_is_better = t["ckp_metric"] != "loss"
    for epoch in range(start_epoch, t["epochs"]):
        started = time.perf_counter()
        train_loss, train_acc = train_one_epoch(state, data, env, out, epoch, t["epochs"], t["log_interval"], progress)
        progress = EpochProgress()
        sync_buffers_from_main(model.module)  # ranks' BatchNorm statistics drift apart; evaluate and save rank 0's
        evaluated = {split: evaluate(model.compiled, loader, data.augment.normalize, data.num_classes, num_per_cls, env,
                                     amp_dtype, fixed_batch=loader.batch_sampler.batch_size if compile_model else None)
                     for split, loader in data.eval.items()}
        last = {"epoch": epoch + 1, "selected_on": select_on, **evaluated["test"]}
        score = evaluated[select_on][t["ckp_metric"]]
        improved = best is None or (score > best["score"] if higher_is_better else score < best["score"])
        if improved:
            best = {"score": score, **last}
        for split, metrics in evaluated.items():
            out.eval_metrics(split, metrics, state.step)
        out.scalars({f"best/{k}": best[k] for k in BEST}, state.step)
        seconds = time.perf_counter() - started
        out.scalars({"train/epoch_acc": train_acc, "train/epoch_seconds": seconds}, state.step)
        out.epoch_row({"epoch": epoch + 1, "step": state.step, "train_loss": train_loss, "train_acc": train_acc,
                       "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                       **{f"{split}_{k}": m[k] for split, m in evaluated.items() for k in ("loss", "acc", "bcr", "many", "medium", "few", "ece")}})
        out.info(f"epoch {epoch + 1}: " + "  ".join(f"{split} acc {m['acc']:.4f} bcr {m['bcr']:.4f}" for split, m in evaluated.items())
                 + f"  best {select_on} {t['ckp_metric']} {best['score']:.4f} (epoch {best['epoch']})")
        save(epoch + 1, progress, ["last.pt", "best.pt"] if improved else ["last.pt"])
        if epoch == start_epoch:
            set_collective_timeout(t["dist_timeout_s"])
        if epoch + 1 == t["epochs"]:
            out.wait_for_checkpoints(raise_error=False)  # results.json only once the last checkpoint is on disk
        signum = int(agree(torch.zeros(0, dtype=torch.float64, device=env.device), signals.received, out)[-1])
        if signum and epoch + 1 < t["epochs"]:
            raise Stopped(f"stopped by signal {signum} after epoch {epoch + 1}; last.pt holds this point: "
                          "continue with TRAIN.resume auto", signum)
    results = {"best": best, "last": last, "num_per_cls": num_per_cls, "ckp_metric": t["ckp_metric"],
               "seconds": seconds_before + time.perf_counter() - started_at,
               "stage1": os.path.abspath(os.path.dirname(stage1)) if stage1 else None}
    out.results(results)
    out.info(f"done: {describe_best(best)}; "
             f"last test acc {last['acc']:.4f} bcr {last['bcr']:.4f}; results in {config.run_dir(cfg)}/results.json")
    return results


if __name__ == "__main__":  # `python -m bsdist.train CONFIG ...` is launch.py
    from bsdist.cli import run
    sys.exit(run())
