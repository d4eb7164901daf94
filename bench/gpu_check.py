"""What bsdist must do on a GPU that its CPU test suite cannot show, checked in one command.

    python bench/gpu_check.py [--device auto|cpu|cuda] [--out gpu_check.json] [--budget-s 450]

Prints one line per check, `PASS name: detail`, `FAIL name: detail` or `SKIP name: reason`; writes a
JSON file with every check (status, detail, figures, seconds) and the torch / CUDA / driver versions,
the GPUs and the date (rewritten after each check, so a cut-short run leaves what it did); exits 1
when any check fails. Sized for one H100 / H200 in under 8 minutes (the throughput sweep shrinks to
fit --budget-s), and right with up to 8 GPUs visible. `--device cpu` rehearses it without a GPU: the
checks that need CUDA say SKIP and why, after running what of them the CPU can. Nothing is
downloaded: CIFAR-10 files in the official pickle layout are generated into a temporary directory.

 1 environment      CUDA visible, native bf16; torch, CUDA, driver versions; GPU count and names
 2 stop_and_resume  a run stopped by SIGTERM once a mid-epoch last.pt exists and resumed (TRAIN.resume
                    auto) ends like an uninterrupted run: compiled bf16 on CUDA, eager fp32 on CPU (exactly)
 3 resume_elsewhere a checkpoint resumed with fewer GPUs (2 -> 1 via CUDA_VISIBLE_DEVICES), on the CPU
                    (one GPU), or by 1 process (CPU: 2 -> 1)
 4 device_binding   torchrun's LOCAL_RANK r trains on GPU r; with one GPU, NCCL ranks sharing it are
                    refused in one line naming it, and TRAIN.dist_backend gloo lets them share it
 5 fp16_scaler      a short compiled fp16 run (GradScaler) ends with a finite loss
 6 no_host_sync     steady-state steps never wait for the device (torch.cuda.set_sync_debug_mode "error"
                    between the host's read points), compiled bf16 and fp16, and bf16 fed by a DataLoader
 7 sync_bn          2 processes with SyncBatchNorm end with the weights of 1 process at the same global
                    batch; graphs compiled with and without it; its step time
 8 throughput       bench/throughput.py's measurements: training sweep and share of the bf16 matmul peak,
                    evaluation, the reference grid's estimated wall time
 9 checkpoint_cost  what training waits for at a checkpoint (the copy to host memory) against the whole
                    background write, ResNet-18 with momentum
10 jpeg_input       image files decoded by DataLoader workers (img/s per core, times the node's cores per
                    GPU) against DATASET.loader device (nvJPEG): the faster, and 3,000 img/s per GPU; both
                    loaders' crops of every kind of JPEG alike; decoding on the device never overwrites
                    memory the training stream still reads
The checks are in bench/gpucheck/ (grouped by theme, with the child processes they start); this script
runs them in order, prints and writes the report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback

import torch

# before bsdist: gpucheck imports timing, which puts the repository root on sys.path
from gpucheck.costs import check_checkpoint_cost, check_throughput
from gpucheck.environment import check_environment, versions
from gpucheck.jpeg_input import check_jpeg_input
from gpucheck.processes import check_device_binding, check_sync_bn
from gpucheck.resume import check_resume_elsewhere, check_stop_and_resume
from gpucheck.runs import CheckFailed, Context, Skip, kill_group, write_run_config
from gpucheck.steps import check_fp16_scaler, check_no_host_sync
from gpucheck.workers import WORKERS, run_worker

from bsdist.config import resolve_device
from bsdist.distributed import init_distributed, shutdown
from bsdist.errors import BsdistError

# Generated CIFAR-10 (balanced: the runs use imbalance factor 1) per device: on CUDA enough steps per
# epoch (156 at batch 32) that SIGTERM lands mid-epoch; on 2 CPU cores 6 steps an epoch.
TRAIN_PER_CLASS = {"cuda": 500, "cpu": 20}
TEST_PER_CLASS = {"cuda": 100, "cpu": 10}


CHECKS = [check_environment, check_stop_and_resume, check_resume_elsewhere, check_device_binding, check_fp16_scaler,
          check_no_host_sync, check_sync_bn, check_throughput, check_checkpoint_cost, check_jpeg_input]


def run_check(check, ctx: Context) -> dict:
    name = check.__name__.removeprefix("check_")
    started = time.perf_counter()
    figures = {}
    try:
        detail, figures = check(ctx)
        status = "PASS"
    except Skip as e:
        status, detail, figures = "SKIP", str(e), e.figures
    except CheckFailed as e:
        status, detail, figures = "FAIL", str(e), e.figures
    except Exception as e:  # noqa: BLE001 - a broken check is a failed check; the others still run
        status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip()[:600]}"
        figures = {"traceback": traceback.format_exc()[-4000:]}
    finally:
        for proc in ctx.children:  # what a failed check left running would hold the GPU during the next ones
            kill_group(proc)
        ctx.children.clear()
    print(f"{status} {name}: {detail}", flush=True)
    return {"name": name, "status": status, "detail": detail, "figures": figures,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall time the script aims to stay within: the throughput sweep shrinks to fit "
                             "(default 450 on CUDA, none on CPU)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args) or 0
    started = time.time()
    report = {**versions(), "device": args.device, "checks": []}

    def write():
        report["wall_s"] = round(time.time() - started, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    try:
        device = resolve_device(args.device)
    except BsdistError as e:
        report["checks"].append({"name": "environment", "status": "FAIL", "detail": str(e), "figures": {},
                                 "seconds": 0})
        print(f"FAIL environment: {e}")
        write()
        return 1
    report["device"] = device
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        budget = args.budget_s or (450 if device == "cuda" else math.inf)
        ctx = Context(device, torch.cuda.device_count() if device == "cuda" else 0, workdir,
                      init_distributed(device, 600), started + budget)
        try:
            ctx.config = write_run_config(workdir, "cifar", TRAIN_PER_CLASS[device], TEST_PER_CLASS[device])
            ctx.small_config = write_run_config(workdir, "cifar-small", TRAIN_PER_CLASS["cpu"], TEST_PER_CLASS["cpu"])
            for check in CHECKS:
                report["checks"].append(run_check(check, ctx))
                write()
        finally:
            shutdown()
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    write()
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {report['wall_s']:.0f} s "
          f"on {device}; wrote {args.out}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
