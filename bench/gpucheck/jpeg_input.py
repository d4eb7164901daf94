"""Check 10, jpeg_input: where image files are decoded fastest on this node, the worker path per CPU core
against DATASET.loader device's decoding on the training device, and whether one GPU gets the 3,000
decoded and augmented images per second that ResNet-50 bf16 training consumes (issue 12's target).

On CUDA it also shows that decoding on the device leaves the training stream's memory alone: blocks freed
while the stream's queued kernels still read them are not overwritten by bsdist's decode_jpegs_on, and
how often torchvision's own decode_jpeg, called with the training stream current, overwrote them."""

from __future__ import annotations

import os

import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.runs import Context, Skip, require
from timing.jpeg_input import make_images, time_bsdist, time_device_decode

from bsdist.data.imagefiles import decode_jpegs_on

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
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    data, device = [read_file(path) for path in paths[:8]], ctx.env.device
    figures["overwritten_bsdist"] = overwritten(lambda: decode_jpegs_on(data, device), device)
    figures["overwritten_torchvision"] = overwritten(
        lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device), device)  # the training stream current
    safety = (f"freed memory overwritten while the training stream still read it: {figures['overwritten_bsdist']} "
              f"of {TRIALS} trials with bsdist's decode, {figures['overwritten_torchvision']} with torchvision's own")
    require(figures["overwritten_bsdist"] == 0, safety, figures)
    require(best >= TARGET_IMG_PER_S, f"{detail}: below the target of {TARGET_IMG_PER_S:,} img/s per GPU", figures)
    return f"{detail}; faster here: {faster}; {safety}", figures


TRIALS = 50


def overwritten(decode, device: torch.device) -> int:
    """In how many of TRIALS trials `decode` wrote into memory the current stream had freed but still read:
    each trial fills blocks of a decoded image's size with known values, queues a long kernel and then a
    sum of each block, frees the blocks, decodes, and compares the sums with their exact values."""
    numel = 3 * 375 * 500 // 4  # float32 blocks of one decoded 500 x 375 image's bytes, so the allocator reuses them
    bad = 0
    for _ in range(TRIALS):
        blocks = [torch.full((numel,), float(k + 1), device=device) for k in range(8)]
        torch.cuda.synchronize(device)
        torch.cuda._sleep(50_000_000)  # the queued training step: the sums below wait behind it
        sums = torch.stack([block.sum() for block in blocks])
        del blocks  # freed on the stream while its sums are still queued
        images = decode()
        torch.cuda.synchronize(device)
        expected = torch.arange(1, 9, dtype=torch.float32, device=device) * numel
        bad += int(not torch.equal(sums, expected))
        del images
    return bad
