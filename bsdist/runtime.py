"""What the machine decides about a run, resolved once: the device, the agreed precision, compilation,
synchronised BatchNorm (and why), the process group's backend and the data loader. The Trainer and
`--evaluate` read it; the log has it in one line and the run directory in runtime.json."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from bsdist import config
from bsdist.config import Config
from bsdist.distributed import DistEnv, rank_max
from bsdist.errors import BsdistError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}  # TRAIN.mixed_precision, resolved
# What each loader the data builder may return does (DATASET.loader auto picks by the dataset's size).
LOADERS = {"DeviceLoader": "device: batches sliced from the uint8 images held on the training device",
           "DecodeOnDevice": "device: DataLoader workers read the files, the training device decodes the JPEGs",
           "DataLoader": "dataloader: DataLoader workers decode and feed batches from host memory"}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    world_size: int
    precision: str  # TRAIN.mixed_precision resolved: bf16, fp16 or no, the same on every rank
    compile: bool  # TRAIN.compile resolved
    sync_bn: bool  # MODEL.sync_bn resolved
    sync_bn_reason: str
    backend: str  # the process group's, as torch.distributed names it ("cpu:gloo,cuda:nccl")
    loader: str  # what feeds the training batches (LOADERS), once the data is built; "" for evaluation

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]

    def autocast(self):
        """The forward pass's autocast: the resolved precision on this device, or nothing for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_dict(self) -> dict:
        return {**asdict(self), "device": str(self.device)}

    def describe(self) -> str:
        return (f"{self.world_size} process(es) on {self.device.type} ({self.backend}); precision {self.precision}; "
                f"compile {str(self.compile).lower()}; " + (f"loader {self.loader.split(':')[0]}" if self.loader
                                                              else "evaluation only"))


def resolve_runtime(cfg: Config, env: DistEnv, train_loader=None) -> Runtime:
    """The run's machine-dependent settings, the same answer on every rank (called by every rank: precision
    auto is agreed with one all-reduce). train_loader, where there is one, names the loader."""
    t = cfg.TRAIN
    sync_bn, reason = config.resolve_sync_bn(cfg, env.world_size)
    return Runtime(env.device, env.world_size, agreed_precision(t.mixed_precision, env),
                   t.compile is True or (t.compile == "auto" and env.device.type == "cuda"), sync_bn, reason,
                   str(dist.get_backend()), LOADERS[type(train_loader).__name__] if train_loader is not None else "")


def agreed_precision(name: str, env: DistEnv) -> str:
    """TRAIN.mixed_precision resolved on this rank's device, the same on every rank: auto picks per GPU (bf16
    where it is native, else fp16), and ranks on different GPU models would average scaled fp16 gradients
    with unscaled bf16 ones. One all-reduce and one read at start-up, on every rank or none (the setting is
    the same everywhere)."""
    resolved = config.resolve_precision(name, env.device.type)
    if name != "auto" or env.world_size == 1:
        return resolved
    code = list(AMP_DTYPES).index(resolved)
    highest, lowest = rank_max(env.device, code, -code)
    if highest != -lowest:
        raise BsdistError("TRAIN.mixed_precision auto chose bf16 on some ranks' GPUs and fp16 on others (different "
                          "GPU models); set TRAIN.mixed_precision fp16 (or bf16 where every GPU has it)")
    return resolved
