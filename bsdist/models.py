"""Models by name. ResNet-18 with the CIFAR stem: 3x3 stride-1 first convolution and no max-pool."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18
    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# name -> builder(num_classes, in_channels); MODEL.name is validated against these keys
MODELS: dict[str, Callable[[int, int], nn.Module]] = {"resnet18": resnet18}


def create(cfg: dict, num_classes: int, in_channels: int, device: torch.device) -> nn.Module:
    """The plain model on the device, channels_last, with SyncBatchNorm if asked for."""
    model = MODELS[cfg["MODEL"]["name"]](num_classes, in_channels)
    if cfg["MODEL"]["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last)


def distribute(module: nn.Module, device: torch.device, bucket_mb: float, static_graph: bool,
               gradient_as_bucket_view: bool = True) -> nn.parallel.DistributedDataParallel:
    """DDP for a small model. Gradients are views into the all-reduce buckets (no copy into them, one
    gradient-sized buffer less). A static graph is only valid without no_sync: torch 2.14 asserts in
    the reducer on the first accumulated backward (pytorch#187732), so it needs grad_accum_steps 1."""
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               bucket_cap_mb=bucket_mb, gradient_as_bucket_view=gradient_as_bucket_view,
                                               static_graph=static_graph)


def build_model(cfg: dict, num_classes: int, in_channels: int, device: torch.device, compile_model: bool):
    """Return (the plain module whose state_dict is saved, the module to run: compiled, then DDP-wrapped).

    Either order compiles on the first call, inside DDP's forward, where dynamo splits the graph at the
    buckets so all-reduces overlap the backward; compiling first keeps the plain module reachable
    without unwrapping a compiled DDP (measured against wrapping first in BENCHMARKS.md).
    """
    model = create(cfg, num_classes, in_channels, device)
    runnable = torch.compile(model) if compile_model else model
    t = cfg["TRAIN"]
    return model, distribute(runnable, device, t["ddp_bucket_mb"], static_graph=t["grad_accum_steps"] == 1)
