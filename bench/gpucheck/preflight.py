"""Preflight, in seconds before anything else: the versions every report starts with, and the pieces the
checks need (a driver new enough for this torch build, scikit-learn, a C compiler and Python's headers for
Triton, free disk), each missing one named in one line; the checks that need it then skip."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import time

import torch

# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA toolkit release notes, table 3:
# minor-version compatibility within a major version): torch's cu130 build needs a 580-series driver.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
MIN_FREE_GB = 10  # the checkpoints of the gpu tests' runs, the JPEG files, the compile caches

# what each check needs beyond CUDA; preflight reports which are missing
NEEDS = {"sklearn": "scikit-learn (pip install scikit-learn): the timed training runs on its digits images",
         "compiler": "a C compiler and Python's headers (apt-get install gcc python3-dev): Triton builds each "
                     "compiled kernel's launcher with them, so nothing can be compiled",
         "disk": f"{MIN_FREE_GB} GB free under --out"}


def versions() -> dict:
    facts = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "driver": None, "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
             "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    return facts


def preflight(device: str, out: str, facts: dict) -> tuple[dict, list[str]]:
    """(figures, one line per missing piece); figures["missing"] lists the NEEDS keys the checks look up."""
    missing, lines = [], []
    if device == "cuda":
        needed = MIN_DRIVER.get(int(torch.version.cuda.split(".")[0])) if torch.version.cuda else None
        driver = facts["driver"]
        if torch.version.cuda is None:
            lines.append(f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch")
        elif driver and needed and int(driver.split(".")[0]) < needed:
            lines.append(f"driver {driver} is older than torch {torch.__version__} (CUDA {torch.version.cuda}) needs: "
                         f"a {needed}-series driver or newer, or torch built for an older CUDA")
    if importlib.util.find_spec("sklearn") is None:
        missing.append("sklearn")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")) or not os.path.exists(headers):
        missing.append("compiler")
    free_gb = shutil.disk_usage(out).free / 2**30
    if free_gb < MIN_FREE_GB:
        missing.append("disk")
    lines += [f"missing {NEEDS[key]}" for key in missing]
    figures = {"missing": missing, "free_gb": round(free_gb, 1), "python_headers": headers}
    if device == "cuda" and torch.cuda.is_available():
        figures.update(native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                       capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        if not figures["native_bf16"]:
            lines.append("no native bf16 on this GPU, so TRAIN.mixed_precision auto trains in fp16")
    return figures, lines
