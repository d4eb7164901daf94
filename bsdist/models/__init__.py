"""How a run builds and wraps its model: the architecture by name (zoo), pretrained weights, a frozen
backbone for decoupled stage 2, SyncBatchNorm (syncbn), torch.compile, DDP.

Every model's classifier is its `fc` (CLASSIFIER), what decoupled training re-trains and post-hoc
methods adjust.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bsdist.config import Config
from bsdist.errors import BsdistError
from bsdist.models.syncbn import SyncBatchNorm, _GlobalBatchStats, convert_sync_batchnorm
from bsdist.models.zoo import MODELS, Float32Linear, load_pretrained, resnet18

__all__ = ["CLASSIFIER", "MODELS", "Built", "Float32Linear", "SyncBatchNorm", "_GlobalBatchStats", "build_model",
           "classifier", "convert_sync_batchnorm", "create", "distribute", "freeze_backbone", "grads_in_buckets",
           "no_sync", "resnet18"]


CLASSIFIER = "fc"


def classifier(model: nn.Module) -> nn.Linear:
    """The model's classifier (its `fc`), or one error for a model without one."""
    head = getattr(model, CLASSIFIER, None)
    if not isinstance(head, nn.Linear):
        raise BsdistError(f"{type(model).__name__} has no linear classifier named {CLASSIFIER}, which decoupled "
                          "training and post-hoc methods adjust; use a model of bsdist.models.MODELS such as resnet18")
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
        own = model.state_dict()
        wrong = [k for k in own if not k.startswith(CLASSIFIER + ".")
                 and (k not in backbone or backbone[k].shape != own[k].shape)]
        wrong += [k for k in backbone if k not in own]
        if wrong:
            raise BsdistError(f"the stage-1 checkpoint does not fit this model ({len(wrong)} keys such as {wrong[0]}); "
                              "CRT.stage1 must name a run of the same MODEL.name and MODEL.stem")
        model.load_state_dict({k: v for k, v in backbone.items() if not k.startswith(CLASSIFIER + ".")}, strict=False)

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


def create(cfg: Config, num_classes: int, in_channels: int, device: torch.device, sync_bn: bool,
           backbone: dict | None = None, pretrained: bool = True) -> nn.Module:
    """The plain model on the device, channels_last: its stem as MODEL.stem says (resolved by validation),
    initialised from MODEL.pretrained where set (pretrained=False: a checkpoint's weights follow),
    SyncBatchNorm if asked for; for a stage 2 (CRT.stage1) with its backbone frozen, loaded from
    `backbone` where given."""
    m = cfg.MODEL
    model = MODELS[m.name](num_classes, in_channels, stem=m.stem)
    if m.pretrained and pretrained and backbone is None:
        load_pretrained(model, m.pretrained, CLASSIFIER)
    if cfg.CRT.stage1:
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


def build_model(cfg: Config, num_classes: int, in_channels: int, device: torch.device, compile_model: bool,
                sync_bn: bool = False, backbone: dict | None = None, pretrained: bool = True) -> Built:
    """The model as a run uses it.

    Either order of compile and DDP compiles on the first call, inside DDP's forward, where dynamo
    splits the graph at the buckets so all-reduces overlap the backward (measured in BENCHMARKS.md);
    compiling first keeps the plain module reachable without unwrapping a compiled DDP.
    """
    model = create(cfg, num_classes, in_channels, device, sync_bn, backbone, pretrained)
    # dynamic=False: evaluation's batch size differs from training's, and automatic dynamic shapes would compile
    # it as a graph for any batch size (slower kernels) although evaluation pads every batch to one size
    compiled = torch.compile(model, dynamic=False) if compile_model else model
    t = cfg.TRAIN
    return Built(model, compiled, distribute(compiled, device, t.ddp_bucket_mb, static_graph=t.grad_accum_steps == 1))


def no_sync(model: nn.Module, last_micro_batch: bool):
    """DDP's no_sync for the micro-batches before the last of an accumulation group; else nothing."""
    if last_micro_batch or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def grads_in_buckets(model: nn.Module) -> bool:
    """Whether DDP keeps model's gradients as views into its all-reduce buckets: zero them then, never set them
    to None, or the next backward allocates fresh gradients and DDP copies them into the buckets again."""
    return isinstance(model, nn.parallel.DistributedDataParallel) and model.gradient_as_bucket_view
