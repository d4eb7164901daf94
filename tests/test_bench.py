"""The benchmarks and the GPU check run end to end on CPU: they time the steps they claim and write finite
figures (their sizes are not checked here), and the GPU check says which of its checks need CUDA."""

import json
import math
import subprocess
import sys

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


CPU_CHECKS = {"stop_and_resume", "resume_elsewhere", "sync_bn", "checkpoint_cost"}
CUDA_CHECKS = {"environment", "device_binding", "fp16_scaler", "no_host_sync", "throughput", "jpeg_input"}


@pytest.mark.slow
def test_gpu_check_rehearses_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    stdout, report = run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(out)], out,
                         timeout=1500)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["environment", "stop_and_resume", "resume_elsewhere", "device_binding", "fp16_scaler",
                            "no_host_sync", "sync_bn", "throughput", "checkpoint_cost", "jpeg_input"]
    for name, check in checks.items():
        expected = "PASS" if name in CPU_CHECKS else "SKIP"
        assert check["status"] == expected, check
        assert f"{expected} {name}: {check['detail']}" in stdout
    for name in CUDA_CHECKS - {"environment", "fp16_scaler"}:  # these still ran what the CPU can: "rehearsed"
        assert "needs CUDA" in checks[name]["detail"] and "rehearsed" in checks[name]["detail"], checks[name]
    assert "exactly" in checks["stop_and_resume"]["detail"]
    sync_bn = checks["sync_bn"]["figures"]
    assert sync_bn["distance_synchronised"] <= sync_bn["tolerance"] < sync_bn["distance_per_process"]
    assert sync_bn["graphs"]["on"] >= 1 and sync_bn["graphs"]["off"] >= 1
    cost = checks["checkpoint_cost"]["figures"]
    assert 0 < cost["host_copy_s"] < cost["full_write_s"]
    rehearsed = checks["no_host_sync"]["figures"]["eager fp32"]
    assert rehearsed["error"] is None and rehearsed["steps_checked"] == rehearsed["steps"] - 1  # all but the first step
    assert report["torch"] and report["date"].startswith("20") and report["gpus"] == [] and report["device"] == "cpu"
    jpeg = checks["jpeg_input"]["figures"]
    assert rate(jpeg["workers_img_per_s_per_core"]) and rate(jpeg["decode_on_device_img_per_s"])
    assert "4 passed, 0 failed, 6 skipped" in stdout


def test_jpeg_benchmark_times_both_input_paths_on_the_same_files(tmp_path):
    out = tmp_path / "jpeg.json"
    _, report = run([sys.executable, "bench/jpeg.py", "--images", "16", "--rounds", "2", "--out", str(out)], out)
    assert report["images"] == 16 and report["image_bytes_mean"] > 5_000  # 500 x 375 JPEG files, not thumbnails
    assert len(report["rounds"]["bsdist"]) == len(report["rounds"]["reference"]) == 2
    assert all(rate(r) for r in report["rounds"]["bsdist"] + report["rounds"]["reference"])
    assert report["ratio"] == report["bsdist_img_per_s_per_core"] / report["reference_img_per_s_per_core"]
    assert report["bsdist_img_per_s_per_core"] == max(report["rounds"]["bsdist"])
    assert report["device"] == "cpu (one core)" and rate(report["decode_on_device_img_per_s"])
