"""The settings that depend on the machine: the device, the autocast dtype and synchronised BatchNorm,
resolved where the processes train (a SLURM submission leaves them to the nodes)."""

from __future__ import annotations

import os

from bsdist.config.schema import Config
from bsdist.errors import BsdistError


def check_device(cfg: Config) -> str:
    """The device this process trains on, once the config's device-dependent choices are known to work here."""
    device = resolve_device(cfg.TRAIN.device)
    if device == "cuda" and cfg.TRAIN.mixed_precision == "bf16":
        import torch
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise BsdistError("TRAIN.mixed_precision bf16 is not supported by this GPU; use fp16")
    return device


def resolve_device(name: str) -> str:
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise BsdistError("TRAIN.device cuda but no CUDA device is visible; set TRAIN.device cpu or auto")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        expected = gpus_expected()
        if expected:
            raise BsdistError(f"this node has GPUs ({expected}) but CUDA cannot use them (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda}): install a torch build that matches the driver, "
                              "or set TRAIN.device cpu to train on the CPU")
        return "cpu"
    return name


def gpus_expected(dev: str = "/dev") -> str | None:
    """Why this process should have GPUs (SLURM allocated some, or NVIDIA device files exist), or None."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = os.environ.get(var, "").strip()
        if value and value != "0":
            return f"{var}={value}"
    try:
        devices = sorted(f for f in os.listdir(dev) if f.startswith("nvidia") and f[6:].isdigit())
    except OSError:
        return None
    return os.path.join(dev, devices[0]) if devices else None


def resolve_precision(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device != "cuda":
        return "no"
    import torch
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"  # emulated bf16 is slow


def resolve_sync_bn(cfg: Config, world_size: int) -> tuple[bool, str]:
    """Whether BatchNorm synchronises across processes, and why (for the log)."""
    setting, minimum = cfg.MODEL.sync_bn, cfg.MODEL.sync_bn_batch
    local_batch = cfg.DATASET.batch_size // world_size
    if world_size == 1:
        return False, "one process: its BatchNorm already sees the whole batch"
    if setting != "auto":
        return setting, f"MODEL.sync_bn {str(setting).lower()}"
    if local_batch < minimum:
        return True, (f"{local_batch} images per process is below MODEL.sync_bn_batch {minimum}: statistics of the "
                      f"global batch of {cfg.DATASET.batch_size}, as one process computes them")
    return False, f"{local_batch} images per process (at least MODEL.sync_bn_batch {minimum})"
