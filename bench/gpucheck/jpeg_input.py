"""The data path, jpeg_input: where image files are decoded fastest on this node, the worker path per CPU core
(times the node's cores per GPU) against DATASET.loader device's decoding on the training device, and whether
one GPU gets the 3,000 decoded and augmented images per second that ResNet-50 bf16 training consumes (issue
12's target). Whether both loaders crop alike and the device decode leaves the training stream's memory alone
are tests/test_gpu.py's."""

from __future__ import annotations

import os

import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.context import Context, Skip
from timing.jpeg_input import make_images, time_bsdist, time_device_decode

TARGET_IMG_PER_S = 3000


def check_jpeg_input(ctx: Context):
    count, rounds, making_s = (512, 3, 20) if ctx.full_size else (32, 1, 3)
    figures = ctx.figures
    figures.update(images=count, cpu_cores=os.cpu_count() or 1, gpus=torch.cuda.device_count() if ctx.cuda else 0,
                   workers=[], on_device=[], left_out_for_time=[])
    if not ctx.fits(making_s, f"writing {count} JPEG files", figures["left_out_for_time"]):
        raise Skip(f"budget: {figures['left_out_for_time'][0]}", figures)
    figures["running"] = f"writing {count} JPEG files"  # what a cut check was doing
    ctx.save()
    paths = make_images(ctx.workdir, count)  # 500 x 375, quality 90, as bench/jpeg.py
    figures["running"] = "timing rounds"
    threads = torch.get_num_threads()
    for _ in range(rounds):  # interleaved, the best of each kept; a round takes a few seconds
        if not ctx.fits(5 if ctx.full_size else 2, "a timing round", figures["left_out_for_time"]):
            break
        torch.set_num_threads(1)  # the worker path's figure per core
        figures["workers"].append(time_bsdist(ctx.workdir, paths, 224))
        torch.set_num_threads(threads)
        figures["on_device"].append(time_device_decode(ctx.workdir, paths, 224, torch.device(ctx.device)))
        ctx.save()
    figures.pop("running")
    if not figures["on_device"]:
        raise Skip("budget: no timing round fitted", figures)
    per_core, on_device = max(figures["workers"]), max(figures["on_device"])
    per_gpu = per_core * figures["cpu_cores"] / max(figures["gpus"], 1)
    faster = "DATASET.loader device" if on_device >= per_gpu else "the workers (DATASET.loader auto)"
    return (f"workers {per_core:,.0f} img/s per core ({per_gpu:,.0f} per GPU with this node's {figures['cpu_cores']} "
            f"cores for {max(figures['gpus'], 1)} GPU(s)); DATASET.loader device {on_device:,.0f} img/s on "
            f"{ctx.device}; faster here: {faster}, {max(on_device, per_gpu):,.0f} img/s per GPU (target "
            f"{TARGET_IMG_PER_S:,}); 224 px RandomResizedCrop from {count} 500 x 375 JPEG files"), figures
