"""Checks 8 and 9, what things cost: bench/throughput.py's measurements within the time budget (throughput)
and what training waits for at a checkpoint against the whole background write (checkpoint_cost)."""

from __future__ import annotations

import os
import statistics
import time

import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.runs import Context, Skip, require
from timing.grid import duration, measure_grid
from timing.peak import matmul_peak_tflops, sweep_variants, train_flops_per_image
from timing.training import bench_bsdist_training, bench_config

from bsdist import checkpoint
from bsdist.models import create
from bsdist.optim import build_optimizer

RESERVE_S = 40  # what the checks after the throughput sweep need of the budget (9 and 10: about 30 s)


def setting(compiled: bool, precision: str, batch: int) -> str:
    return f"{'compiled' if compiled else 'eager'} {'fp32' if precision == 'no' else precision} batch {batch}"


def check_throughput(ctx: Context):
    """bench/throughput.py's measurements, the ones the targets are about first, the rest while the budget lasts."""
    if ctx.cuda:
        variants, steps, grid_args = sweep_variants(), 20, ((1, 4, 8), 200, 10, 1024)
    else:  # a reduced rehearsal of the same code: one eager fp32 variant, one batch-32 run for the grid estimate
        variants, steps, grid_args = [(False, "no", 8)], 2, ((1,), 1, 1, 16)
    flops = train_flops_per_image()
    peak = matmul_peak_tflops(ctx.env.device) if ctx.cuda else None
    figures = {"matmul_peak_tflops_bf16": peak, "train_gflop_per_image": flops / 1e9, "sweep": [], "grid": None,
               "left_out_for_time": []}
    compile_s = 60.0  # a first guess at what one compiled variant costs; then the last one's measured cost

    def measure(compiled, precision, batch):
        nonlocal compile_s
        if ctx.left() - RESERVE_S < (compile_s if compiled else 15):
            figures["left_out_for_time"].append(setting(compiled, precision, batch))
            return
        started = time.time()
        r = bench_bsdist_training(batch, ctx.env, steps, compiled, precision)
        compile_s = time.time() - started if compiled else compile_s
        figures["sweep"].append({**vars(r), "share_of_peak": r.img_per_s * flops / 1e12 / peak if peak else None})

    for variant in variants[:2]:  # compiled bf16 at batch 512 and 1024: the peak-share target
        measure(*variant)
    if ctx.left() - RESERVE_S > 60:
        figures["grid"] = measure_grid(ctx.device, *grid_args, ctx.workdir)
    else:
        figures["left_out_for_time"].append("reference grid estimate")
    for variant in variants[2:]:
        measure(*variant)
    rates = sorted(figures["sweep"], key=lambda v: -v["img_per_s"])
    parts = [f"best {setting(v['compiled'], v['precision'], v['batch_size'])}: {v['img_per_s']:,.0f} img/s over "
             f"{v['timed_steps']} timed steps" for v in rates[:1]]
    big = [v["share_of_peak"] for v in rates if v["batch_size"] >= 512]
    if peak and big:
        parts.append(f"best share of the measured {peak:.0f} TFLOP/s bf16 matmul peak at batch >= 512: "
                     f"{100 * max(big):.1f}% (target 40%)")
    if figures["grid"]:
        grid = figures["grid"]
        parts.append(f"evaluation {grid['side_by_side'][0]['eval_img_per_s']:,.0f} img/s (batch {grid_args[3]})")
        parts.append(f"reference grid about {duration(grid['best']['minutes'] * 60)} with {grid['best']['processes']} "
                     "run(s) side by side (target 10 min on one GPU)")
    if figures["left_out_for_time"]:
        parts.append(f"left out for time: {', '.join(figures['left_out_for_time'])}")
    if not ctx.cuda:
        raise Skip(f"needs CUDA; rehearsed reduced on CPU: {'; '.join(parts)}", figures)
    require(bool(big) and figures["grid"] is not None, f"the budget ran out before the figures the targets are about "
            f"(rerun with a larger --budget-s): {'; '.join(parts)}", figures)
    return "; ".join(parts), figures


def check_checkpoint_cost(ctx: Context):
    cfg = bench_config(32, "no", ctx.env, overrides=["OPTIMIZER.momentum", "0.9"])
    model = create(cfg, num_classes=10, in_channels=3, device=ctx.env.device, sync_bn=False)
    optimizer = build_optimizer(cfg, model)  # momentum buffers: a second model's worth
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
    path = os.path.join(ctx.workdir, "cost.pt")
    writer, copies, writes = checkpoint.CheckpointWriter(), [], []
    for _ in range(3):
        started = time.perf_counter()
        writer.save(state, [path])  # returns once the copy to host memory is made: all training waits for
        copies.append(time.perf_counter() - started)
        writer.wait()
        writes.append(time.perf_counter() - started)
    loaded = checkpoint.load(path)
    figures = {"host_copy_s": statistics.median(copies), "full_write_s": statistics.median(writes),
               "megabytes": os.path.getsize(path) / 2**20}
    require(all(torch.equal(loaded["model"][k], v.cpu()) for k, v in state["model"].items()),
            "the written checkpoint differs")
    detail = (f"ResNet-18 with momentum ({figures['megabytes']:.0f} MB on {ctx.device}): training waits "
              f"{1000 * figures['host_copy_s']:.0f} ms for the host copy; the background write takes "
              f"{1000 * figures['full_write_s']:.0f} ms in all (median of 3)")
    require(figures["host_copy_s"] < figures["full_write_s"], f"{detail}: the copy is not cheaper than the write",
            figures)
    return detail, figures
