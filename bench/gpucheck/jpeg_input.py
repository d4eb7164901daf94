"""Check 10, jpeg_input: where image files are decoded fastest on this node, the worker path per CPU core
against DATASET.loader device's decoding on the training device, and whether one GPU gets the 3,000
decoded and augmented images per second that ResNet-50 bf16 training consumes (issue 12's target).

It compares the two loaders' evaluation crops of one picture saved as every kind of JPEG (grey, CMYK,
progressive, 4:4:4, 4:2:0): on the CPU they are identical, on a GPU nvJPEG and libjpeg-turbo may differ
by rounding, not by colours. On CUDA it also shows that decoding on the device leaves the training
stream's memory alone: blocks the training stream freed while its queued kernels still read them are not
overwritten by bsdist's decode_jpegs_on (torchvision's own decode_jpeg, called with the training stream
current, is counted beside it: when it overwrites nothing either, the trial proved nothing here), nor
are decoded images the training stream still reads once they are freed and the next batch is decoded."""

from __future__ import annotations

import os

import numpy as np
import torch

# before bsdist: timing puts the repository root on sys.path
from gpucheck.runs import Context, Skip, require
from timing.jpeg_input import make_images, time_bsdist, time_device_decode

from bsdist.data.imagefiles import ImageFiles, decode_jpegs_on

TARGET_IMG_PER_S = 3000
MAX_LEVELS = 3.0  # mean absolute difference, in 0-255 levels, allowed between the loaders' crops on a GPU
KINDS = {"grey": ("L", {}), "cmyk": ("CMYK", {}), "progressive": ("RGB", {"progressive": True}),
         "444": ("RGB", {"subsampling": 0}), "420": ("RGB", {"subsampling": 2})}
TRIALS = 50


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
    figures["levels_apart"] = levels_apart(paths[0], os.path.join(ctx.workdir, "jpeg_kinds"), ctx.env.device)
    worst = max(figures["levels_apart"], key=figures["levels_apart"].get)
    parity = (f"the loaders' crops of {len(KINDS)} kinds of JPEG at most {figures['levels_apart'][worst]:.2f} levels "
              f"apart on average ({worst})")
    require(figures["levels_apart"][worst] <= (MAX_LEVELS if ctx.cuda else 0), f"{parity}: {figures['levels_apart']}",
            figures)
    if not ctx.cuda:
        raise Skip(f"needs CUDA; rehearsed on CPU: {detail}; {parity}", figures)
    best = max(on_device, figures["workers_img_per_s_per_gpu"])
    faster = "loader device" if on_device >= figures["workers_img_per_s_per_gpu"] else "the workers (loader auto)"
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    data, device = [read_file(path) for path in paths[:16]], ctx.env.device
    numel = 3 * 375 * 500 // 4  # float32 blocks of one decoded 500 x 375 image's bytes, so the allocator reuses them

    def blocks():
        return [torch.full((numel,), float(k + 1), device=device) for k in range(8)]

    def torchvision_decode():  # with the training stream current
        return decode_jpeg(data[:8], mode=ImageReadMode.RGB, device=device)
    figures["overwritten"] = {
        "bsdist": overwritten(blocks, lambda: decode_jpegs_on(data[:8], device), device),
        "torchvision": overwritten(blocks, torchvision_decode, device),
        "bsdist_outputs": overwritten(lambda: decode_jpegs_on(data[:8], device),
                                      lambda: decode_jpegs_on(data[8:], device), device)}
    counts = figures["overwritten"]
    safety = (f"memory the training stream freed but still read overwritten in {counts['bsdist']} of {TRIALS} trials "
              f"with bsdist's decode ({counts['torchvision']} with torchvision's own"
              f"{': the trial provoked nothing here' if counts['torchvision'] == 0 else ''}), decoded images in "
              f"{counts['bsdist_outputs']}")
    require(counts["bsdist"] == 0 and counts["bsdist_outputs"] == 0, safety, figures)
    require(best >= TARGET_IMG_PER_S, f"{detail}: below the target of {TARGET_IMG_PER_S:,} img/s per GPU", figures)
    return f"{detail}; faster here: {faster}; {parity}; {safety}", figures


def levels_apart(picture: str, root: str, device: torch.device) -> dict:
    """Per kind of JPEG, the mean absolute difference (0-255 levels) between the workers' evaluation crop of
    `picture` saved as that kind and DATASET.loader device's crop on `device`."""
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    names = [f"{kind}.jpg" for kind in KINDS]
    with Image.open(picture) as image:
        for name, (mode, options) in zip(names, KINDS.values()):
            image.convert(mode).save(os.path.join(root, name), quality=90, **options)
    targets, keys = np.zeros(len(names)), list(range(len(names)))
    workers = ImageFiles(root, names, targets, 224, False, seed=0).__getitems__(keys)[0]
    encoded = ImageFiles(root, names, targets, 224, False, seed=0, encoded=True)
    packed, _, keys = encoded.__getitems__(keys)
    on_device = encoded.decode_batch(packed, keys, device).cpu()
    return {kind: float((on_device[j].float() - workers[j].float()).abs().mean()) for j, kind in enumerate(KINDS)}


def overwritten(fill, decode, device: torch.device) -> int:
    """In how many of TRIALS trials `decode` wrote into memory the current (training) stream had freed but
    still read: each trial takes the tensors `fill` makes and their sums, queues a long kernel and then each
    tensor's sum again, frees the tensors, decodes, and compares the queued sums with the first ones."""
    bad = 0
    for _ in range(TRIALS):
        blocks = fill()
        expected = torch.stack([block.sum() for block in blocks])
        torch.cuda.synchronize(device)
        torch.cuda._sleep(50_000_000)  # the queued training step: the sums below wait behind it
        sums = torch.stack([block.sum() for block in blocks])
        del blocks  # freed while their sums are still queued
        images = decode()
        torch.cuda.synchronize(device)
        bad += int(not torch.equal(sums, expected))
        del images
    return bad
