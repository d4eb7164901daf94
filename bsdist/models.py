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


def build_model(cfg: dict, num_classes: int, in_channels: int, device: torch.device, compile_model: bool):
    """Return (the plain module whose state_dict is saved, the module to run: compiled and DDP-wrapped)."""
    model = MODELS[cfg["MODEL"]["name"]](num_classes, in_channels)
    if cfg["MODEL"]["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    runnable = torch.compile(model) if compile_model else model
    ddp = nn.parallel.DistributedDataParallel(runnable, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp
