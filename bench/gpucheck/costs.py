"""The timed checks: training throughput against the measured matmul peak (throughput), what training waits for
at a checkpoint (checkpoint_cost) and the reference grid's wall time from runs side by side (grid). Each part
reads the time left first and is left out, named, when its estimate does not fit."""

from __future__ import annotations

import os
import statistics
import time

import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.context import Context, Skip, require
from timing.grid import describe_grid, measure_grid
from timing.peak import matmul_peak_tflops, train_flops_per_image
from timing.training import TimedTrainer, bench_config

from bsdist import checkpoint
from bsdist.models import create
from bsdist.optim import build_optimizer

# (model, image size, batch per GPU, timed steps) compiled in bf16, the settings the 40%-of-peak target is about
# first; the CPU sizes are one eager fp32 rehearsal. First guesses of a variant's cost (compile included) on one
# H100 / H200 until one of that model was measured.
SETTINGS = {"cuda": [("resnet18", 32, 512, 20), ("resnet50", 224, 512, 10), ("resnet18", 32, 1024, 20),
                     ("resnet50", 224, 1024, 10)],
            "cpu": [("resnet18", 32, 8, 2)]}
FIRST_GUESS_S = {"cuda": {"resnet18": 60, "resnet50": 120}, "cpu": {"resnet18": 15}}
PEAK_TARGET = 0.4


def check_throughput(ctx: Context):
    compiled, precision = (True, "bf16") if ctx.full_size else (False, "no")
    figures = ctx.figures
    figures.update(sweep=[], left_out_for_time=[], compiled=compiled, precision=precision,
                   matmul_peak_tflops_bf16=matmul_peak_tflops(torch.device(ctx.device)) if ctx.cuda else None)
    ctx.save()
    cost = dict(FIRST_GUESS_S[ctx.sizes])
    for model, size, batch, steps in SETTINGS[ctx.sizes]:
        what = f"{model} {size} px batch {batch}"
        if not ctx.fits(cost[model], what, figures["left_out_for_time"]):
            continue
        started = time.time()
        entry = {"model": model, "image_size": size, "batch_size": batch}
        figures["running"] = f"{what}, started {time.strftime('%H:%M:%S')}"  # what a cut check was doing
        ctx.save()
        try:
            trainer = TimedTrainer(batch, ctx.env, steps, compiled, precision, model=model, image_size=size)
            entry["time_to_first_step_s"] = trainer.first_step()
            entry["img_per_s"], entry["timed_steps"] = trainer.timed_rate()
        except torch.OutOfMemoryError:
            entry["out_of_memory"] = True
        finally:
            trainer = None
            if ctx.cuda:
                torch.cuda.empty_cache()
        cost[model] = time.time() - started
        entry["gflop_per_image"] = train_flops_per_image(model, size) / 1e9
        if figures["matmul_peak_tflops_bf16"] and "img_per_s" in entry:
            entry["share_of_peak"] = entry["img_per_s"] * entry["gflop_per_image"] / 1e3 / figures[
                "matmul_peak_tflops_bf16"]
        figures["sweep"].append(entry)
        figures.pop("running")
        ctx.save()
    parts = [f"{v['model']} {v['image_size']} px batch {v['batch_size']}: "
             + ("out of memory" if v.get("out_of_memory") else f"{v['img_per_s']:,.0f} img/s"
                + (f" ({100 * v['share_of_peak']:.0f}% of peak)" if "share_of_peak" in v else ""))
             for v in figures["sweep"]]
    if figures["matmul_peak_tflops_bf16"]:
        parts.insert(0, f"bf16 matmul peak {figures['matmul_peak_tflops_bf16']:.0f} TFLOP/s")
    if figures["left_out_for_time"]:
        parts.append(f"left out for time: {', '.join(figures['left_out_for_time'])}")
    detail = (f"{'compiled bf16' if compiled else 'eager fp32'} on {ctx.device}"
              f"{', cudnn.benchmark on' if ctx.cuda else ''}: {'; '.join(parts)}")
    if not any("img_per_s" in v for v in figures["sweep"]):
        raise Skip(f"budget: nothing measured; {detail}", figures)
    shares = [v["share_of_peak"] for v in figures["sweep"] if "share_of_peak" in v]
    if shares:
        detail += f"; best share {100 * max(shares):.0f}% (target {100 * PEAK_TARGET:.0f}%)"
    return detail, figures


def check_checkpoint_cost(ctx: Context):
    left_out = []
    if not ctx.fits(10, "building ResNet-18 and its optimiser", left_out):
        raise Skip(f"budget: {left_out[0]}")
    cfg = bench_config(32, "no", ctx.env, overrides=["OPTIMIZER.momentum", "0.9"])
    model = create(cfg, num_classes=10, in_channels=3, device=ctx.env.device, sync_bn=False)
    optimizer = build_optimizer(cfg, model)  # momentum buffers: a second model's worth
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
    path = os.path.join(ctx.workdir, "cost.pt")
    writer, copies, writes = checkpoint.CheckpointWriter(), [], []
    for _ in range(3):
        if writes and not ctx.fits(2 * writes[-1], "another write", left_out):
            break
        started = time.perf_counter()
        writer.save(state, [path])  # returns once the copy to host memory is made: all training waits for
        copies.append(time.perf_counter() - started)
        writer.wait()
        writes.append(time.perf_counter() - started)
    loaded = checkpoint.load(path)
    figures = {"host_copy_s": statistics.median(copies), "full_write_s": statistics.median(writes),
               "megabytes": os.path.getsize(path) / 2**20}
    os.remove(path)
    require(all(torch.equal(loaded["model"][k], v.cpu()) for k, v in state["model"].items()),
            "the written checkpoint differs")
    detail = (f"ResNet-18 with momentum ({figures['megabytes']:.0f} MB on {ctx.device}): training waits "
              f"{1000 * figures['host_copy_s']:.0f} ms for the host copy; the background write takes "
              f"{1000 * figures['full_write_s']:.0f} ms in all (median of {len(writes)})")
    require(figures["host_copy_s"] < figures["full_write_s"], f"{detail}: the copy is not cheaper than the write",
            figures)
    return detail, figures


def check_grid(ctx: Context):
    """The reference grid's wall time from k = 4 batch-32 runs side by side on the first GPU (k = 1 on CPU sizes),
    each a fresh process that compiles its own graphs, its inductor pool sized to its share of the cores."""
    k, steps, eval_batches, test_batch = (4, 100, 10, 1024) if ctx.full_size else (1, 1, 1, 16)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 1) // k))
    grid = measure_grid(ctx.device, (k,), steps, eval_batches, test_batch, ctx.workdir, timeout=ctx.left())
    ctx.figures.update(grid)
    side = grid["side_by_side"][0]
    return (f"{describe_grid(grid)}; measured: training {side['train_img_per_s']:,.0f} img/s and evaluation "
            f"{side['eval_img_per_s']:,.0f} img/s in all, start-up {side['startup_s']:.0f} s each"), ctx.figures
