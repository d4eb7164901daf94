"""The benchmarks and the GPU check run end to end on CPU: they time the steps they claim and write finite
figures (their sizes are not checked here), and the GPU check says which of its checks need CUDA."""

import json
import math
import subprocess
import sys
import time

import pytest
from paths import ROOT



def run(args, out, timeout=300, returncode=0):
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return proc.stdout, json.load(f)


def rate(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_throughput_benchmark_compares_both_paths_and_estimates_the_grid(tmp_path):
    out = tmp_path / "bench.json"
    stdout, report = run([sys.executable, "bench/throughput.py", "--device", "cpu", "--batch-size", "16",
                          "--steps", "2", "--data-batches", "2", "--grid-steps", "1", "--grid-eval-batches", "1",
                          "--grid-test-batch", "16", "--out", str(out)], out)
    assert "data path alone" in stdout and "reference grid" in stdout and "runs side by side not measured" in stdout
    for part in ("data_path", "training"):
        assert rate(report[part]["reference_img_per_s"]) and rate(report[part]["bsdist_img_per_s"])
        assert report[part]["ratio"] == report[part]["bsdist_img_per_s"] / report[part]["reference_img_per_s"]
    assert report["training"]["timed_steps"] == 2 and report["training"]["time_to_first_step_s"] > 0
    grid = report["grid"]
    (side,) = grid["side_by_side"]  # CPU: one run at a time
    assert side["processes"] == 1 and side["timed_steps"] == [1] and side["test_batch"] == 16
    assert rate(side["train_img_per_s"]) and rate(side["eval_img_per_s"]) and side["startup_s"] > 0
    best = grid["best"]
    assert best["minutes"] == report["grid_minutes_estimate"] and best["minutes"] > 0
    assert best["minutes"] * 60 == pytest.approx(best["training_s"] + best["evaluation_s"] + best["startup_s"])
    assert best["startup_s"] == 18 * side["startup_s"]  # 18 runs, one after another


@pytest.mark.slow
def test_ddp_benchmark_times_every_variant_on_two_processes(tmp_path):
    out = tmp_path / "ddp.json"
    stdout, report = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "bench/ddp.py",
                          "--device", "cpu", "--batch-size", "8", "--steps", "1", "--repeats", "2",
                          "--out", str(out)], out)
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["steps_per_turn"] == 1
    names = [v["name"] for v in report["variants"]]
    assert names[:3] == ["no DDP (upper bound)", "DDP defaults", "+ gradient_as_bucket_view"] and len(names) == 6
    bsdist = [v for v in report["variants"] if v.get("bsdist")]
    assert len(bsdist) == 1 and bsdist[0]["ddp"]["static_graph"] and bsdist[0]["ddp"]["gradient_as_bucket_view"]
    for v in report["variants"]:
        assert len(v["turns"]) == 2 and all(rate(t) for t in v["turns"]) and v["name"] in stdout
    assert next(v for v in report["variants"] if v["name"] == "DDP defaults")["ratio_to_ddp_defaults"] == 1.0


CHECKS = ["preflight", "throughput", "jpeg_input", "gpu_tests", "checkpoint_cost", "grid"]


def gpu_check(tmp_path, budget_s, *args):
    """bench/gpu_check.py on the CPU with this budget: (stdout, report, the wall time seen from outside)."""
    started = time.time()
    stdout, report = run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(tmp_path / "out"),
                          "--budget-s", str(budget_s), *args], tmp_path / "out" / "gpu_check.json",
                         timeout=budget_s + 120)
    return stdout, report, time.time() - started


def test_gpu_check_ends_within_a_tiny_budget_skipping_every_check(tmp_path):
    """20 s at the CUDA sizes, less than any check needs: each says "budget" without starting; a check that ignored
    the time left would start, be cut at its time limit and fail this."""
    stdout, report, wall_s = gpu_check(tmp_path, 20, "--sizes", "cuda")
    checks = report["checks"]
    assert [c["name"] for c in checks] == CHECKS and report["budget_s"] == 20 and report["sizes"] == "cuda"
    assert checks[0]["status"] == "PASS"  # preflight: seconds
    for check in checks[1:]:
        assert check["status"] == "SKIP" and check["detail"].startswith("budget: ") and "cut" not in check["detail"]
        assert f"SKIP {check['name']}: {check['detail']}" in stdout
    # the script's own accounting, which starts before its imports: these alone took 20 s on 2 busy cores
    assert report["wall_s"] <= 20 + 30 and wall_s < 20 + 90
    again = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(tmp_path / "out")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a GPU check's report; give another --out" in again.stderr


@pytest.mark.slow
def test_gpu_check_rehearses_on_cpu(tmp_path):
    """The default budget at the CPU sizes: every check passes, or is skipped for its time on a busy machine
    (never cut); the gpu tests are collected and skipped without CUDA."""
    stdout, report, _ = gpu_check(tmp_path, 420)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CHECKS and report["wall_s"] <= 420 + 30 and report["device"] == "cpu"
    assert checks["preflight"]["status"] == checks["throughput"]["status"] == "PASS"
    for check in checks.values():
        assert not check.get("cut_at_deadline") and check["status"] != "FAIL", check
    tests = checks["gpu_tests"]["figures"]["tests"]
    assert checks["gpu_tests"]["status"] == "SKIP" and tests and all(t["status"] == "SKIP" for t in tests.values())
    (measured,) = checks["throughput"]["figures"]["sweep"]
    assert rate(measured["img_per_s"]) and measured["model"] == "resnet18" and measured["gflop_per_image"] > 1
    if checks["checkpoint_cost"]["status"] == "PASS":
        cost = checks["checkpoint_cost"]["figures"]
        assert 0 < cost["host_copy_s"] < cost["full_write_s"]
    if checks["jpeg_input"]["status"] == "PASS":
        assert rate(checks["jpeg_input"]["figures"]["workers"][0])
    if checks["grid"]["status"] == "PASS":
        assert checks["grid"]["figures"]["best"]["minutes"] > 0
    out = tmp_path / "out"
    assert (out / "01-throughput.err").exists() and (out / "gpu_tests.xml").exists()
    assert report["torch"] and report["date"].startswith("20")


def test_jpeg_benchmark_times_both_input_paths_on_the_same_files(tmp_path):
    out = tmp_path / "jpeg.json"
    _, report = run([sys.executable, "bench/jpeg.py", "--images", "16", "--rounds", "2", "--out", str(out)], out)
    assert report["images"] == 16 and report["image_bytes_mean"] > 5_000  # 500 x 375 JPEG files, not thumbnails
    assert len(report["rounds"]["bsdist"]) == len(report["rounds"]["reference"]) == 2
    assert all(rate(r) for r in report["rounds"]["bsdist"] + report["rounds"]["reference"])
    assert report["ratio"] == report["bsdist_img_per_s_per_core"] / report["reference_img_per_s_per_core"]
    assert report["bsdist_img_per_s_per_core"] == max(report["rounds"]["bsdist"])
    assert report["device"] == "cpu (one core)" and rate(report["decode_on_device_img_per_s"])
