"""Check 1 (environment) and the versions every report starts with."""

from __future__ import annotations

import contextlib
import platform
import shutil
import subprocess
import time

import torch

from gpucheck.runs import Context, Skip, require


def check_environment(ctx: Context):
    figures = {"cuda_visible": torch.cuda.is_available(), "gpus": ctx.gpus}
    if not ctx.cuda:
        raise Skip("--device cpu: no GPU in use (versions are in the JSON)", figures)
    names = [torch.cuda.get_device_name(i) for i in range(ctx.gpus)]
    figures.update(names=names, native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    facts = versions()
    described = (f"{ctx.gpus} GPU(s) ({', '.join(sorted(set(names)))}), torch {facts['torch']}, CUDA {facts['cuda']}, "
                 f"driver {facts['driver']}")
    require(figures["native_bf16"], f"{described}: no native bf16, so TRAIN.mixed_precision auto trains in fp16",
            figures)
    return described + ", native bf16", figures


def versions() -> dict:
    facts = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "driver": None, "python": platform.python_version(), "host": platform.node(),
             "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    return facts
