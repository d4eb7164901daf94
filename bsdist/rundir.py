"""What a run directory holds, read before anything starts: whether a run may start or continue there,
its results when it has finished, its saved config, and the stage-1 run a decoupled stage 2 builds on.

Read-only, so a sweep or a SLURM submission can ask before any process group exists. A run asks once,
on rank 0 (plan_start), and every rank follows that answer: with a node-local DEFAULT.savedir, or a
shared file system that lags, ranks reading for themselves would disagree on whether to resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from bsdist import checkpoint, config
from bsdist.config import Config
from bsdist.errors import BsdistError

RUN_FILES = ("last.pt", "results.json")  # what makes a run directory hold a run: trained weights, or a finished run
# Stage 2 trains on stage 1's features, so it must see the same images through the same model.
SAME_AS_STAGE1 = ("DATASET.name", "DATASET.imbalance_type", "DATASET.imbalance_factor", "DATASET.split_seed",
                  "DATASET.val_per_cls", "DATASET.train_list", "DATASET.val_list", "DATASET.test_list",
                  "DATASET.image_size", "MODEL.name", "MODEL.stem")


def saved_config(run_dir: str) -> Config:
    """The config.yaml of a run directory, validated as it was when the run started (all but the device,
    which is the business of whoever trains), or one error."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise BsdistError(f"{run_dir} holds no config.yaml, so it is not a bsdist run directory; "
                          "name a directory <savedir>/<dataset>/<model>/<exp_name> that a run wrote")
    try:
        return config.validate(config.read_yaml(path, "saved config", "config.yaml"), device_here=False)
    except BsdistError as e:
        raise BsdistError(f"{path}: {e}") from None


def resume_checkpoint(cfg: Config) -> str | None:
    """The checkpoint to continue from, or None for a fresh run; refuses to overwrite another run.

    A directory without last.pt or results.json holds no trained work (an attempt that stopped before
    its first checkpoint, a non-finite loss say): a new attempt starts afresh there, whatever its
    settings.
    """
    from bsdist.distributed import restarted_by_launcher
    run_dir, resume = config.run_dir(cfg), cfg.TRAIN.resume
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if not held:
        if resume is True:
            raise BsdistError(f"TRAIN.resume true but {run_dir} holds no checkpoint to continue from; check "
                              "DEFAULT.savedir and DEFAULT.exp_name, or use TRAIN.resume auto to start the run when "
                              "there is none")
        return None
    if resume is False and not restarted_by_launcher():  # torchrun's restart continues the run
        raise BsdistError(f"run directory {run_dir} already holds a run ({', '.join(held)}); continue it with "
                          "TRAIN.resume auto, or choose another DEFAULT.exp_name or DEFAULT.savedir")
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        changed = config.changed_keys(saved_config(run_dir), cfg)
        if changed:
            raise BsdistError(f"cannot resume {run_dir}: {', '.join(changed)} differ from the saved config.yaml; "
                              "restore those values, or start a new run under another DEFAULT.exp_name")
    last = os.path.join(run_dir, "last.pt")
    return last if os.path.exists(last) else None


def results_of(run_dir: str) -> dict | None:
    """The results of a finished run (results.json is written only at its very end), else None."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def selected_checkpoint(run_dir: str) -> str | None:
    """best.pt of a finished run (results.json written, best.pt there), else None."""
    best = os.path.join(run_dir, "best.pt")
    return best if results_of(run_dir) is not None and os.path.exists(best) else None


def finished_results(cfg: Config) -> dict | None:
    return results_of(config.run_dir(cfg))


@dataclass(frozen=True)
class Start:
    """How a run starts, as rank 0 read its run directory; each checkpoint named with the sha256 of rank
    0's file, which every rank's copy must match."""
    resume_from: str | None = None  # a file name in the run directory (each rank's own, if node-local)
    resume_digest: str | None = None
    stage1: str | None = None  # a stage 2's stage-1 best.pt
    stage1_digest: str | None = None
    finished: dict | None = None  # the results of a run that already finished: nothing to do


def plan_start(cfg: Config) -> Start:
    """Whether the run continues (from the newest checkpoint that verifies), starts afresh or has finished;
    one error where it may not start at all."""
    resume_from = resume_checkpoint(cfg)
    stage1 = stage1_checkpoint(cfg)
    finished = finished_results(cfg)
    if finished is not None:
        return Start(finished=finished)
    if resume_from is not None:
        resume_from, digest = newest_verified(resume_from)
        resume_from = os.path.basename(resume_from)
        best = os.path.join(config.run_dir(cfg), "best.pt")
        if os.path.exists(best) and checkpoint.recorded_digest(best) not in (None, checkpoint.file_digest(best)):
            checkpoint.LOG.warning(f"{best} does not match its digest: the selected model is damaged; the run writes "
                                   "it again when the selected metric next improves, and until then stage 2 and "
                                   "--evaluate refuse it")
        return Start(resume_from, digest, stage1)  # a resume has its own weights: stage 1's are not read
    return Start(stage1=stage1, stage1_digest=checkpoint.read_verified(stage1)[1] if stage1 else None)


def newest_verified(last: str) -> tuple[str, str]:
    """last (last.pt) and its sha256, or, where it does not match its digest, the checkpoint before it
    (last.prev.pt) when that one does, saying so in one line; one error when neither does."""
    try:
        return last, checkpoint.read_verified(last)[1]
    except checkpoint.Damaged as e:
        earlier = checkpoint.previous(last)
        digest = checkpoint.file_digest(earlier) if os.path.exists(earlier) else None  # hashed once
        if digest is None or checkpoint.recorded_digest(earlier) != digest:
            raise BsdistError(f"{e}; no earlier checkpoint verifies either ({os.path.basename(earlier)}), so "
                              "nothing is loaded") from None
        checkpoint.LOG.warning(f"{e}; continuing from the checkpoint before it, {earlier}")
        return earlier, digest


def stage1_checkpoint(cfg: Config) -> str | None:
    """best.pt of the finished stage-1 run that CRT.stage1 names, once it is known to fit this run; None
    for a run of its own."""
    stage1 = cfg.CRT.stage1
    if stage1 is None:
        return None
    if not os.path.isdir(stage1):
        raise BsdistError(f"CRT.stage1 {stage1} is not a directory; name the run directory of a finished stage-1 run "
                          "(<savedir>/<dataset>/<model>/<exp_name>, holding results.json and best.pt)")
    saved = saved_config(stage1)
    if saved.CRT.stage1:
        raise BsdistError(f"CRT.stage1 {stage1} is itself a stage-2 run; name the stage-1 run it came from "
                          f"({saved.CRT.stage1})")
    best = selected_checkpoint(stage1)
    if best is None:
        raise BsdistError(f"CRT.stage1 {stage1} has not finished (no results.json and best.pt); finish it first "
                          "(run its config again with TRAIN.resume auto), then start stage 2")
    for key in SAME_AS_STAGE1:
        if config.get(saved, key) != config.get(cfg, key):
            raise BsdistError(f"CRT.stage1 {stage1} was trained with {key} {config.get(saved, key)} and this run has "
                              f"{config.get(cfg, key)}: stage 2 must see stage 1's data and model; set {key} "
                              f"{config.get(saved, key)}")
    return best
