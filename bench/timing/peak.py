"""What the GPU could do and what the sweep tries: the measured bf16 matmul peak, the FLOPs of one training
image (for the share of that peak a training reaches) and the settings of the CUDA sweep."""

from __future__ import annotations

import time

import torch

from timing.data_path import sync

from bsdist.models import MODELS


def matmul_peak_tflops(device, n=8192, repeats=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def train_flops_per_image(model_name: str = "resnet18", image_size: int = 32):
    """Forward and backward FLOPs of one image through the model MODEL.name `model_name` builds at that size."""
    stem = "imagenet" if image_size > 64 else "cifar"  # as timing.training.model_overrides
    from torch.utils.flop_counter import FlopCounterMode
    model = MODELS[model_name](10, 3, stem)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(1, 3, image_size, image_size)).sum().backward()
    return counter.get_total_flops()


def sweep_variants():
    """(compiled, precision, batch) of the CUDA sweep, the settings that matter most first."""
    return [(compiled, precision, batch) for compiled in (True, False) for precision in ("bf16", "fp16")
            for batch in (512, 1024, 128)]
