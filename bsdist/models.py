"""Models by name, and how a run wraps them: SyncBatchNorm, torch.compile, DDP.

ResNet-18 has the CIFAR stem (3x3 stride-1 first convolution, no max-pool) and a classifier that
computes in fp32 under autocast: bf16 logits (8 significant bits) tie often with 100+ classes, and
argmax then favours the lowest class index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from bsdist.errors import BsdistError


class Float32Linear(nn.Linear):
    """nn.Linear that runs in fp32 whatever the autocast dtype around it (same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18
    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = Float32Linear(model.fc.in_features, num_classes)
    return model


# name -> builder(num_classes, in_channels); MODEL.name is validated against these keys. Every model's
# classifier is its `fc` (Float32Linear), what decoupled training re-trains and post-hoc methods adjust.
MODELS: dict[str, Callable[[int, int], nn.Module]] = {"resnet18": resnet18}
CLASSIFIER = "fc"


def classifier(model: nn.Module) -> nn.Linear:
    """The model's classifier (its `fc`), or one error for a model without one."""
    head = getattr(model, CLASSIFIER, None)
    if not isinstance(head, nn.Linear):
        raise BsdistError(f"{type(model).__name__} has no linear classifier named {CLASSIFIER}, which decoupled training "
                          "and post-hoc methods adjust; use a model of bsdist.models.MODELS such as resnet18")
    return head


def freeze_backbone(model: nn.Module, backbone: dict | None) -> nn.Module:
    """Stage 2 of decoupled training: everything but the classifier frozen, BatchNorm included.

    `backbone` (stage 1's state dict) is loaded into all but the classifier, which keeps its fresh
    initialisation; None builds the frozen structure for a checkpoint of the stage-2 run itself.
    Every BatchNorm becomes torchvision's FrozenBatchNorm2d, a fixed affine map from its running
    statistics whether or not the model is in training mode, and no backbone parameter takes gradients.
    """
    from torchvision.ops import FrozenBatchNorm2d
    classifier(model)
    if backbone is not None:
        missing, unexpected = model.load_state_dict({k: v for k, v in backbone.items()
                                                     if not k.startswith(CLASSIFIER + ".")}, strict=False)
        wrong = [k for k in missing if not k.startswith(CLASSIFIER + ".")] + list(unexpected)
        if wrong:
            raise BsdistError(f"the stage-1 checkpoint does not fit this model ({len(wrong)} keys such as {wrong[0]}); "
                              "CRT.stage1 must name a run of the same MODEL.name")

    def frozen(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                fixed = FrozenBatchNorm2d(child.num_features, child.eps).to(child.weight.device)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(fixed, key).copy_(getattr(child, key).detach())
                setattr(module, name, fixed)
            else:
                frozen(child)
    frozen(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(CLASSIFIER + "."))
    return model


class _GlobalBatchStats(torch.autograd.Function):
    """Batch normalisation over the batches of all ranks: one all-reduce forward, one backward.

    Every rank holds the same number of images (training drops the last partial batch), so sums
    all-reduce exactly and no count is exchanged. torch's SyncBatchNorm instead drops empty ranks with
    a boolean mask, a host synchronisation per layer per step (pytorch#78549), and has no CPU kernels.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, count):
        dims = [0, *range(2, x.ndim)]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least, also under autocast
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims)])
        dist.all_reduce(stats)
        mean, square = (stats / count).chunk(2)
        var = (square - mean * mean).clamp(min=0)
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(var * (count / (count - 1)), momentum)
        shape = (1, -1, *[1] * (x.ndim - 2))
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count, ctx.shape = count, shape
        return (xhat * weight.view(shape) + bias.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = [0, *range(2, xhat.ndim)], ctx.shape
        dy = grad_out.to(xhat.dtype)
        grad_bias, grad_weight = dy.sum(dims), (dy * xhat).sum(dims)
        sums = torch.cat([grad_bias, grad_weight])  # each rank's loss gradient; DDP averages the parameters'
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = (sums / ctx.count).view(2, *shape).unbind(0)
        grad_x = (dy - sum_dy - xhat * sum_dy_xhat) * (weight * invstd).view(shape)
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (every rank's images), so
    2 ranks train like 1 process with the same global batch; CPU (gloo) and CUDA alike. Evaluation and
    a world of one process use plain BatchNorm. Parameters and buffers are BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if not self.training or world_size == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        count = x.numel() // x.shape[1] * world_size
        return _GlobalBatchStats.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum,
                                       self.eps, count)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in module replaced by a SyncBatchNorm holding the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if not (child.affine and child.track_running_stats and child.momentum is not None):
                raise ValueError(f"{name}: SyncBatchNorm needs affine BatchNorm2d with running statistics and a momentum")
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, device=child.weight.device)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def create(cfg: dict, num_classes: int, in_channels: int, device: torch.device, sync_bn: bool,
           backbone: dict | None = None) -> nn.Module:
    """The plain model on the device, channels_last, with SyncBatchNorm if asked for; for a stage 2
    (CRT.stage1) with its backbone frozen, loaded from `backbone` where given."""
    model = MODELS[cfg["MODEL"]["name"]](num_classes, in_channels)
    if cfg["CRT"]["stage1"]:
        model = freeze_backbone(model, backbone)
    if sync_bn:
        model = convert_sync_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last)


def distribute(module: nn.Module, device: torch.device, bucket_mb: float, static_graph: bool,
               gradient_as_bucket_view: bool = True) -> nn.Module:
    """DDP for a small model; at world size 1 the module itself (DDP would only add copies).

    Gradients are views into the all-reduce buckets (no copy into them, one gradient-sized buffer
    less). A static graph is only valid without no_sync: torch 2.14 asserts in the reducer on the first
    accumulated backward (pytorch#187732), so it needs grad_accum_steps 1. Buffers are not broadcast
    before each forward: training-mode BatchNorm normalises with batch statistics, and rank 0's running
    statistics (the ones evaluated and saved, after distributed.sync_buffers_from_main) are the same
    whether or not the others are overwritten with them every step.
    """
    if dist.get_world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               bucket_cap_mb=bucket_mb, gradient_as_bucket_view=gradient_as_bucket_view,
                                               static_graph=static_graph, broadcast_buffers=False)


@dataclass
class Built:
    module: nn.Module  # the plain model: its state_dict is what checkpoints hold
    compiled: nn.Module  # what evaluation runs: torch.compile(module), or module itself
    train: nn.Module  # what training runs: compiled, DDP-wrapped where there are several processes


def build_model(cfg: dict, num_classes: int, in_channels: int, device: torch.device, compile_model: bool,
                sync_bn: bool = False, backbone: dict | None = None) -> Built:
    """The model as a run uses it.

    Either order of compile and DDP compiles on the first call, inside DDP's forward, where dynamo
    splits the graph at the buckets so all-reduces overlap the backward (measured in BENCHMARKS.md);
    compiling first keeps the plain module reachable without unwrapping a compiled DDP.
    """
    model = create(cfg, num_classes, in_channels, device, sync_bn, backbone)
    compiled = torch.compile(model) if compile_model else model
    t = cfg["TRAIN"]
    return Built(model, compiled, distribute(compiled, device, t["ddp_bucket_mb"], static_graph=t["grad_accum_steps"] == 1))


def no_sync(model: nn.Module, last_micro_batch: bool):
    """DDP's no_sync for the micro-batches before the last of an accumulation group; else nothing."""
    if last_micro_batch or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
