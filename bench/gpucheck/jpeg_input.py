"""Check 10, jpeg_input: where image files are decoded fastest on this node, the worker path per CPU core
against DATASET.loader device's decoding on the training device, and whether one GPU gets the 3,000
decoded and augmented images per second that ResNet-50 bf16 training consumes (issue 12's target)."""

from __future__ import annotations

import os

import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.runs import Context, Skip, require
from timing.jpeg_input import make_images, time_bsdist, time_device_decode

TARGET_IMG_PER_S = 3000


def check_jpeg_input(ctx: Context):
    count, rounds = (512, 3) if ctx.cuda else (32, 1)
    root = os.path.join(ctx.workdir, "jpeg")
    paths = make_images(root, count)  # 500 x 375, quality 90, as bench/jpeg.py
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker path's figure per core
    try:
        per_core = max(time_bsdist(root, paths, 224) for _ in range(rounds))
    finally:
        torch.set_num_threads(threads)
    on_device = max(time_device_decode(root, paths, 224, ctx.env.device) for _ in range(rounds))
    cores = os.cpu_count() or 1
    gpus = max(ctx.gpus, 1)
    figures = {"images": count, "workers_img_per_s_per_core": per_core, "decode_on_device_img_per_s": on_device,
               "cpu_cores": cores, "gpus": ctx.gpus, "workers_img_per_s_per_gpu": per_core * cores / gpus}
    detail = (f"workers {per_core:,.0f} img/s per core ({figures['workers_img_per_s_per_gpu']:,.0f} per GPU with "
              f"this node's {cores} cores for {gpus} GPU(s)); DATASET.loader device {on_device:,.0f} img/s on "
              f"{ctx.device}; 224 px RandomResizedCrop from 500 x 375 JPEG files")
    if not ctx.cuda:
        raise Skip(f"needs CUDA; rehearsed on CPU: {detail}", figures)
    best = max(on_device, figures["workers_img_per_s_per_gpu"])
    faster = "loader device" if on_device >= figures["workers_img_per_s_per_gpu"] else "the workers (loader auto)"
    require(best >= TARGET_IMG_PER_S, f"{detail}: below the target of {TARGET_IMG_PER_S:,} img/s per GPU", figures)
    return f"{detail}; faster here: {faster}", figures
