"""The correctness checks, gpu_tests: tests/test_gpu.py (pytest -m gpu) within the time left. Each test reads the
deadline (BSDIST_GPU_DEADLINE) and skips, saying so, when its estimate does not fit; their runs' logs (with
TORCH_LOGS=recompiles) stay in pytest's folder under --out, a failed test's among them."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from gpucheck.context import CheckFailed, Context, Skip, last_lines, start_child

TESTS = os.path.join("tests", "test_gpu.py")


def check_gpu_tests(ctx: Context):
    report = os.path.join(ctx.out, "gpu_tests.xml")
    command = [sys.executable, "-m", "pytest", TESTS, "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider", "-rA",
               "--junitxml", report, "--basetemp", ctx.workdir]
    if "compiler" in ctx.missing:  # Triton cannot build kernels: the compiled tests would fail for that alone
        command += ["-k", "not compiled"]
    logs = os.path.join(ctx.out, "gpu_tests-pytest")
    # in this check's session: when gpu_check.py ends the check at its time limit, pytest and its runs end too
    # the tests' deadline comes early enough for a test cut by it to end its runs and pytest to write its report
    proc = start_child(command, logs, {"BSDIST_GPU_DEADLINE": repr(ctx.deadline - 15)}, own_session=False)
    try:
        proc.wait(timeout=max(1.0, ctx.left()))
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
    if not os.path.exists(report):
        with open(logs + ".out") as f:
            raise CheckFailed(f"pytest exited {proc.returncode} without a report: {last_lines(f.read())}")
    tests = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        status = {None: "PASS", "skipped": "SKIP"}.get(getattr(outcome, "tag", None), "FAIL")
        message = (outcome.get("message") or "") if outcome is not None else ""
        tests[case.get("name")] = {"status": status, "seconds": float(case.get("time", 0)), "detail": message[:600]}
    ctx.figures.update(tests=tests)
    counts = {s: [name for name, t in tests.items() if t["status"] == s] for s in ("PASS", "FAIL", "SKIP")}
    detail = (f"{len(counts['PASS'])} passed, {len(counts['FAIL'])} failed, {len(counts['SKIP'])} skipped of "
              f"{len(tests)} (pytest -m gpu {TESTS}; logs under {ctx.workdir})")
    if counts["FAIL"]:
        raise CheckFailed(f"{detail}: failed {', '.join(counts['FAIL'])}", ctx.figures)
    if not counts["PASS"]:
        raise Skip(detail, ctx.figures)
    return detail, ctx.figures
