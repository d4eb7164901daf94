"""The benchmarks run end to end on CPU and write the figures they print (their numbers are not checked here)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, out, timeout=300):
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return proc.stdout, json.load(f)


def test_throughput_benchmark_compares_both_paths_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    stdout, report = run([sys.executable, "bench/throughput.py", "--device", "cpu", "--batch-size", "16", "--steps", "1",
                          "--data-batches", "2", "--out", str(out)], out)
    assert "data path alone" in stdout and "reference grid" in stdout
    for part in ("data_path", "training"):
        assert report[part]["reference_img_per_s"] > 0 and report[part]["bsdist_img_per_s"] > 0
        assert report[part]["ratio"] == report[part]["bsdist_img_per_s"] / report[part]["reference_img_per_s"]
    assert report["training"]["time_to_first_step_s"] > 0 and report["grid_minutes_estimate"] > 0


def test_ddp_benchmark_times_every_variant_on_two_processes(tmp_path):
    out = tmp_path / "ddp.json"
    stdout, report = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "bench/ddp.py",
                          "--device", "cpu", "--batch-size", "8", "--steps", "1", "--repeats", "2", "--out", str(out)], out)
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    names = [v["name"] for v in report["variants"]]
    assert names[:3] == ["no DDP (upper bound)", "DDP defaults", "+ gradient_as_bucket_view"] and len(names) == 6
    bsdist = [v for v in report["variants"] if v.get("bsdist")]
    assert len(bsdist) == 1 and bsdist[0]["ddp"]["static_graph"] and bsdist[0]["ddp"]["gradient_as_bucket_view"]
    for v in report["variants"]:
        assert len(v["turns"]) == 2 and v["img_per_s"] > 0 and v["name"] in stdout
    assert next(v for v in report["variants"] if v["name"] == "DDP defaults")["ratio_to_ddp_defaults"] == 1.0
