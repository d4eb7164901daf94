"""The architectures of the long-tail literature, by name (MODEL.name), each with its classifier as `fc`.

- resnet32: the CIFAR ResNet of He et al. (2016) that LDAM-DRW and BALMS train on CIFAR-LT: 3 stages
  of 5 basic blocks (16, 32, 64 channels), identity shortcuts zero-padded where the width doubles
  ("option A"), 0.46 M parameters; defined for 32 px images only.
- resnet10 (OLTR, decoupling and BALMS on ImageNet-LT), resnet18, resnet50, resnext50_32x4d (the
  decoupling / BALMS stage-1 backbone), resnet152 (Places-LT, fine-tuned from ImageNet weights): the
  torchvision ResNets, with the ImageNet stem (7x7 stride-2 convolution and max-pool) for large
  images and the CIFAR stem (3x3 stride-1 convolution, no max-pool) for small ones.

Every classifier computes in fp32 under autocast (Float32Linear): bf16 logits (8 significant bits)
tie often with 100+ classes, and argmax then favours the lowest class index.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bsdist.config.schema import MODEL_NAMES, check_registry
from bsdist.errors import BsdistError

STEMS = ("cifar", "imagenet")


class Float32Linear(nn.Linear):
    """nn.Linear that runs in fp32 whatever the autocast dtype around it (same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _torchvision(name: str, **kwargs) -> Callable[[int, int, str], nn.Module]:
    def build(num_classes: int, in_channels: int, stem: str = "cifar") -> nn.Module:
        import torchvision.models
        if name == "resnet10":
            from torchvision.models.resnet import BasicBlock, ResNet
            model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        else:
            model = getattr(torchvision.models, name)(num_classes=num_classes, **kwargs)
        if stem == "cifar":
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        model.fc = Float32Linear(model.fc.in_features, num_classes)
        return model
    build.__name__ = name
    return build


class _CifarBlock(nn.Module):
    """A basic block whose shortcut, where the width doubles, subsamples and zero-pads (no parameters)."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - inplanes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride],
                             (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(_CifarBlock(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = Float32Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet32(num_classes: int, in_channels: int, stem: str = "cifar") -> nn.Module:
    if stem != "cifar":
        raise BsdistError("resnet32 is the CIFAR ResNet, defined for 32 px images; use MODEL.stem cifar (or auto) with "
                          "small images, or a torchvision ResNet such as resnet50 for large ones")
    return CifarResNet(5, num_classes, in_channels)


# name -> builder(num_classes, in_channels, stem); MODEL.name is validated against these keys.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet32": resnet32,
    "resnet10": _torchvision("resnet10"),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d"),
    "resnet152": _torchvision("resnet152"),
}
check_registry("bsdist.models.MODELS", MODELS, MODEL_NAMES)
resnet18 = MODELS["resnet18"]


def load_pretrained(model: nn.Module, path: str, classifier: str) -> None:
    """Initialise from a local checkpoint (a state dict, or a checkpoint holding one under `model` or
    `state_dict`), read without unpickling code. The classifier is kept fresh when its shape differs
    (ImageNet's 1,000 classes against Places-LT's 365); any other mismatch is one error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BsdistError(f"MODEL.pretrained {path} does not exist; give the path of a local weights file "
                          "(nothing is downloaded at run time)") from None
    except Exception as e:
        raise BsdistError(f"MODEL.pretrained {path} cannot be read as weights ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:80]})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BsdistError(f"MODEL.pretrained {path} holds no state dict")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    head = [k for k in state if k.startswith(classifier + ".") and k in own and state[k].shape != own[k].shape]
    for k in head:
        del state[k]
    missing = [k for k in own if k not in state and not (head and k.startswith(classifier + "."))]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") or \
               (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "") or \
               f"{shape[0]} has shape {tuple(state[shape[0]].shape)}, the model {tuple(own[shape[0]].shape)}"
        raise BsdistError(f"MODEL.pretrained {path} does not fit {type(model).__name__} with MODEL.stem as set: "
                          f"keys {what}; check MODEL.name and MODEL.stem against the weights")
    model.load_state_dict({**own, **state})
