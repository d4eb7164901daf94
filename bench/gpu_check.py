"""What bsdist must do on a GPU that its CPU test suite cannot show, in one command that ends within a budget.

    python bench/gpu_check.py --device cuda --out DIR [--budget-s 420] [--sizes cuda|cpu]

Sized for one short window of one H100 / H200: every check reads the time left and skips, saying why, when
it cannot finish, and the whole script ends within --budget-s, compiles included. In order of value:

 preflight      driver against the torch build, scikit-learn, a compiler and Python's headers for Triton,
                free disk, GPU names and bf16 (seconds); a missing piece is one line, the checks needing it skip
 throughput     the measured bf16 matmul peak; compiled bf16 ResNet-18 (32 px) and ResNet-50 (224 px) at
                batch 512 and 1024 as runs are configured (cudnn.benchmark on): img/s and share of the peak
 jpeg_input     the data path: JPEG files decoded by the workers per core against DATASET.loader device
 gpu_tests      tests/test_gpu.py under pytest: exact resume in deterministic mode, compiled 2-rank SyncBN
                against eager, NCCL ranks sharing one GPU refused, a GPU checkpoint resumed on the CPU,
                compiled fp16, both JPEG loaders alike and the device decode's memory safety
 checkpoint_cost what training waits for at a checkpoint against the whole background write
 grid           the reference grid's wall time from 4 batch-32 runs side by side on the GPU

Each check after preflight runs in a child process (so a check that overruns is ended at the deadline, and
the GPU is free for the next). Everything goes under --out: gpu_check.json (versions, every check's status,
detail, figures, seconds; rewritten after each), each check's <name>.json, its stdout and stderr (with
TORCH_LOGS=recompiles) and its work folder; nothing is deleted, so a failed check leaves its evidence. Prints
`PASS|FAIL|SKIP name: detail` per check; exits 1 when any fails. `--device cpu` rehearses the script; with
`--sizes cuda` at the CUDA sizes, to time each check (BENCHMARKS.md).
"""

from __future__ import annotations

import time

STARTED = time.time()  # the budget counts from here: importing torch takes seconds on a busy machine

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

# before bsdist: gpucheck imports timing, which puts the repository root on sys.path
from gpucheck.context import END_GRACE_S, CheckFailed, Context, Skip, end_child, last_lines, start_child  # noqa: E402
from gpucheck.costs import check_checkpoint_cost, check_grid, check_throughput  # noqa: E402
from gpucheck.gpu_tests import check_gpu_tests  # noqa: E402
from gpucheck.jpeg_input import check_jpeg_input  # noqa: E402
from gpucheck.preflight import preflight, versions  # noqa: E402

from bsdist.config import resolve_device  # noqa: E402
from bsdist.distributed import init_distributed, shutdown  # noqa: E402
from bsdist.errors import BsdistError  # noqa: E402

# name -> (function, what preflight must have found, (least, most) seconds on the CUDA sizes, on the CPU sizes).
# Less time left than `least` (its child's start-up included) and it is skipped without starting; it ends by
# `most` after its start, so that one check whose parts took longer than estimated cannot starve the next ones.
CHECKS = {"throughput": (check_throughput, ["sklearn", "compiler"], (60, 150), (20, 200)),
          "jpeg_input": (check_jpeg_input, [], (30, 45), (10, 60)),
          "gpu_tests": (check_gpu_tests, ["disk"], (60, 200), (10, 120)),
          "checkpoint_cost": (check_checkpoint_cost, [], (20, 30), (10, 60)),
          "grid": (check_grid, ["sklearn", "compiler"], (150, 240), (60, 240))}
CHILD_MARGIN_S = 5  # a check aims to end this long before the deadline, to write its figures


def run_child(args) -> int:
    """One check, in this process (started by run_check); its outcome to <out>/<name>.json."""
    function, *_ = CHECKS[args.check]
    env = init_distributed(args.device, 600)  # a group of one: what the timed Trainer and checkpoints expect
    ctx = Context(args.check, args.device, args.sizes, args.out, args.deadline, env, args.missing.split(","))
    try:
        detail, ctx.figures = function(ctx)
        status = "PASS"
    except (Skip, CheckFailed) as e:
        status, detail, ctx.figures = "SKIP" if isinstance(e, Skip) else "FAIL", str(e), {**ctx.figures, **e.figures}
    except Exception as e:  # noqa: BLE001 - a broken check is a failed check
        status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip()[:600]}"
        ctx.figures["traceback"] = traceback.format_exc()
    finally:
        shutdown()
    ctx.save(status, detail)
    return 0


def run_check(name: str, args, deadline: float, missing: list, log_index: int) -> dict:
    """`name` in a child, ended at the deadline; SKIP without starting when it cannot fit or lacks a piece."""
    _, needs, *sizes = CHECKS[name]
    (least_s, most_s), left = sizes[args.sizes == "cpu"], deadline - time.time()
    # the CPU sizes compile nothing
    lacking = [need for need in needs if need in missing and (need != "compiler" or args.sizes == "cuda")]
    if lacking:
        return {"status": "SKIP", "detail": f"missing: {', '.join(lacking)} (see preflight)"}
    if left < least_s:
        return {"status": "SKIP", "detail": f"budget: {max(left, 0):.0f} s left, it needs at least {least_s} s"}
    deadline = min(deadline, time.time() + most_s)
    logs, result_file = os.path.join(args.out, f"{log_index:02d}-{name}"), os.path.join(args.out, f"{name}.json")
    proc = start_child([sys.executable, os.path.abspath(__file__), "--check", name, "--device", args.device,
                        "--sizes", args.sizes, "--out", args.out, "--deadline", repr(deadline - CHILD_MARGIN_S),
                        "--missing", ",".join(missing)], logs, {"TORCH_LOGS": "recompiles"})
    try:
        proc.wait(timeout=max(1.0, deadline - END_GRACE_S - time.time()))
        cut = False
    except subprocess.TimeoutExpired:
        cut = True
    end_child(proc)  # the check itself if cut, else anything it left running
    try:
        with open(result_file) as f:
            result = json.load(f)
    except (OSError, ValueError):
        with open(logs + ".err") as f:
            result = {"status": "FAIL", "detail": f"exited {proc.returncode} without a result: {last_lines(f.read())}"}
    if cut:  # a check that ignored its time: its figures so far are kept
        doing = result.get("detail") or result.get("figures", {}).get("running") or "no result yet"
        result.update(status="SKIP", cut_at_deadline=True, detail=f"budget: cut at its time limit ({doing})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="gpu_check", help="folder for the report and every check's evidence")
    parser.add_argument("--budget-s", type=float, default=420, help="wall time the whole script ends within")
    parser.add_argument("--sizes", choices=("cuda", "cpu"), help="data and model sizes (default: the device's)")
    parser.add_argument("--check", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--missing", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        return run_child(args)
    started = STARTED
    deadline = started + args.budget_s
    if os.path.exists(os.path.join(args.out, "gpu_check.json")):  # its evidence is kept, never overwritten
        print(f"error: {args.out} already holds a GPU check's report; give another --out", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = {**versions(), "budget_s": args.budget_s, "checks": []}

    def record(name: str, result: dict, since: float) -> None:
        report["checks"].append({"name": name, "seconds": round(time.time() - since, 1), "figures": {}, **result})
        report["wall_s"] = round(time.time() - started, 1)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"{result['status']} {name}: {result['detail']}", flush=True)
        for test, outcome in result.get("figures", {}).get("tests", {}).items():
            print(f"  {outcome['status']} {test} ({outcome['seconds']:.0f} s) {outcome['detail'][:200]}", flush=True)

    try:
        args.device = resolve_device(args.device)
    except BsdistError as e:  # with what preflight can tell of why (a driver too old for this torch build)
        _, lines = preflight("cuda", args.out, report)
        record("preflight", {"status": "FAIL", "detail": "; ".join([str(e), *lines])}, started)
        return 1
    args.sizes = args.sizes or args.device
    report.update(device=args.device, sizes=args.sizes)
    figures, lines = preflight(args.device, args.out, report)
    record("preflight", {"status": "FAIL" if lines else "PASS", "figures": figures,
                         "detail": "; ".join(lines) or f"nothing missing ({figures['free_gb']:.0f} GB free)"}, started)
    for index, name in enumerate(CHECKS, start=1):
        since = time.time()
        record(name, run_check(name, args, deadline, figures["missing"], index), since)
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {report['wall_s']:.0f} s "
          f"(budget {args.budget_s:.0f} s) on {args.device}, {args.sizes} sizes; wrote {args.out}/gpu_check.json")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
