"""How a run builds and wraps its model: the architecture by name (zoo), pretrained weights, a frozen
backbone for decoupled stage 2 (classifier), SyncBatchNorm (syncbn), torch.compile, DDP."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bsdist.config import Config
from bsdist.models.classifier import CLASSIFIER, classifier, freeze_backbone
from bsdist.models.heads import HEADS
from bsdist.models.syncbn import convert_sync_batchnorm
from bsdist.models.zoo import MODELS, load_pretrained


def create(cfg: Config, num_classes: int, in_channels: int, device: torch.device, sync_bn: bool,
           backbone: dict | None = None, pretrained: bool = True) -> nn.Module:
    """The plain model on the device, channels_last: its stem as MODEL.stem says (resolved by validation),
    initialised from MODEL.pretrained where set (pretrained=False: a checkpoint's weights follow),
    SyncBatchNorm if asked for; for a stage 2 (CRT.stage1) with its backbone frozen, loaded from
    `backbone` where given."""
    model = MODELS[cfg.MODEL.name](num_classes, in_channels, stem=cfg.MODEL.stem)
    if cfg.MODEL.classifier != "linear":  # another head in place of the linear one (LDAM-DRW's cosine classifier)
        setattr(model, CLASSIFIER, HEADS[cfg.MODEL.classifier](classifier(model).in_features, num_classes))
    if cfg.MODEL.pretrained and pretrained and backbone is None:
        load_pretrained(model, cfg.MODEL.pretrained, CLASSIFIER)
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
class Model:
    """One model in the three forms a run uses."""
    module: nn.Module  # the plain model: its state_dict is what checkpoints hold
    compiled: nn.Module  # what evaluation runs: torch.compile(module), or module itself
    wrapped: nn.Module  # what training runs: compiled, DDP-wrapped where there are several processes


def build_model(cfg: Config, num_classes: int, in_channels: int, device: torch.device, compile_model: bool,
                sync_bn: bool = False, backbone: dict | None = None, pretrained: bool = True) -> Model:
    """The model as a run uses it.

    Either order of compile and DDP compiles on the first call, inside DDP's forward, where dynamo
    splits the graph at the buckets so all-reduces overlap the backward (measured in BENCHMARKS.md);
    compiling first keeps the plain module reachable without unwrapping a compiled DDP.
    """
    model = create(cfg, num_classes, in_channels, device, sync_bn, backbone, pretrained)
    # dynamic=False: evaluation's batch size differs from training's, and automatic dynamic shapes would compile
    # it as a graph for any batch size (slower kernels) although evaluation pads every batch to one size
    compiled = torch.compile(model, dynamic=False) if compile_model else model
    wrapped = distribute(compiled, device, cfg.TRAIN.ddp_bucket_mb, static_graph=cfg.TRAIN.grad_accum_steps == 1)
    return Model(module=model, compiled=compiled, wrapped=wrapped)


def no_sync(model: nn.Module, last_micro_batch: bool):
    """DDP's no_sync for the micro-batches before the last of an accumulation group; else nothing."""
    if last_micro_batch or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def grads_in_buckets(model: nn.Module) -> bool:
    """Whether DDP keeps model's gradients as views into its all-reduce buckets: zero them then, never set them
    to None, or the next backward allocates fresh gradients and DDP copies them into the buckets again."""
    return isinstance(model, nn.parallel.DistributedDataParallel) and model.gradient_as_bucket_view
