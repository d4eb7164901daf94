"""Checks 2 and 3: a run stopped by SIGTERM resumes to the end of an uninterrupted one (stop_and_resume),
and a checkpoint resumes on fewer GPUs, on the CPU or with fewer processes (resume_elsewhere)."""

from __future__ import annotations

import os

import torch

from gpucheck.runs import Context, Run, last_lines, relative_distance, require

RESUME_TOLERANCE = 1e-3  # on CUDA, the floor of the resumed run's distance to an uninterrupted one


def check_stop_and_resume(ctx: Context):
    precision = (["TRAIN.compile", "true", "TRAIN.mixed_precision", "bf16"] if ctx.cuda
                 else ["TRAIN.mixed_precision", "no"])
    overrides = ["TRAIN.epochs", "2", "TRAIN.ckpt_every_steps", "2", *precision]
    # On CUDA a second uninterrupted run measures how far two runs drift apart anyway (non-deterministic kernels).
    straight = [ctx.launch(name, overrides) for name in (["straight", "straight-again"] if ctx.cuda else ["straight"])]
    stopped_at = Run(ctx, "stopped", overrides).stop_after_checkpoint()
    resumed = Run(ctx, "stopped", overrides).succeeded()
    require("resumed from" in resumed.out, f"the second run did not resume: {last_lines(resumed.out)}")
    reference = straight[0].succeeded()
    ours, theirs = resumed.results()["last"], reference.results()["last"]
    a, b = reference.weights(), resumed.weights()
    figures = {"stopped": stopped_at, "acc": ours["acc"], "acc_uninterrupted": theirs["acc"],
               "loss": ours["loss"], "loss_uninterrupted": theirs["loss"], "weight_distance": relative_distance(a, b)}
    what = f"stopped {stopped_at} by SIGTERM and resumed"
    if not ctx.cuda:
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        require(same and ours == theirs,
                f"{what}, but it ended with other weights or metrics than the uninterrupted run "
                f"(relative weight distance {figures['weight_distance']:.2e})", figures)
        return (f"{what}: eager fp32, 2 epochs; weights and final metrics exactly those of the uninterrupted run",
                figures)
    again = straight[1].succeeded()
    noise = relative_distance(a, again.weights())
    acc_noise = abs(again.results()["last"]["acc"] - theirs["acc"])
    tolerance, acc_tolerance = max(4 * noise, RESUME_TOLERANCE), max(4 * acc_noise, 0.01)
    figures.update(noise_distance=noise, tolerance=tolerance, acc_tolerance=acc_tolerance)
    within = (f"relative weight distance {figures['weight_distance']:.2e} (tolerance max(4 x {noise:.2e} between two "
              f"uninterrupted runs, {RESUME_TOLERANCE:g}) = {tolerance:.2e}); "
              f"test acc {ours['acc']:.4f} vs {theirs['acc']:.4f} (tolerance {acc_tolerance:.3f})")
    require(figures["weight_distance"] <= tolerance and abs(ours["acc"] - theirs["acc"]) <= acc_tolerance,
            f"{what}: outside the tolerance: {within}", figures)
    return f"{what}: compiled bf16, 2 epochs; {within}", figures


def first_visible_gpu() -> str:
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]


def check_resume_elsewhere(ctx: Context):
    if ctx.gpus >= 2:
        what, before, after = "2 GPUs -> 1 GPU", dict(nproc=2), dict(env={"CUDA_VISIBLE_DEVICES": first_visible_gpu()})
    elif ctx.cuda:
        what, before, after = ("1 GPU -> CPU", dict(overrides=["TRAIN.device", "cuda"]),
                               dict(overrides=["TRAIN.device", "cpu"]))
    else:
        what, before, after = "2 CPU processes -> 1", dict(nproc=2), {}
    common = ["TRAIN.epochs", "1", "TRAIN.ckpt_every_steps", "2"]
    stopped_at = Run(ctx, "elsewhere", [*common, *before.pop("overrides", [])], **before).stop_after_checkpoint()
    resumed = Run(ctx, "elsewhere", [*common, *after.pop("overrides", [])], **after).succeeded()
    require("resumed from" in resumed.out, f"{what}: the second run did not resume: {last_lines(resumed.out)}")
    acc = resumed.results()["last"]["acc"]
    return (f"{what}: stopped {stopped_at}, resumed and finished (test acc {acc:.4f})",
            {"stopped": stopped_at, "acc": acc})
