"""The golden run: a fixed-seed demo run (one process, and 2 ranks under torchrun) must reproduce its
recorded fingerprint bit for bit: the final weights' checksum, results.json's metrics and the metrics.csv
rows. A refactoring must not change it; a change of behaviour re-records it in a commit that says why:

    python tests/test_golden.py --record
"""

import csv
import hashlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from paths import ROOT  # noqa: E402
from runs import launch  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden.json")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
ARGS = ["TRAIN.epochs", "3", "TRAIN.device", "cpu", "TRAIN.compile", "false", "TRAIN.log_interval", "3",
        "TRAIN.ckpt_every_steps", "0", "DEFAULT.seed", "3", "DATASET.batch_size", "32"]


def fingerprint(run_dir: str) -> dict:
    """What the run computed, without what varies from machine to machine (time)."""
    import torch
    model = torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(model):
        digest.update(name.encode())
        digest.update(model[name].contiguous().numpy().tobytes())
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    metrics = {key: {k: v for k, v in results[key].items() if k != "seconds"} for key in ("best", "last")}
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return {"weights_sha256": digest.hexdigest(), "results": metrics, "metrics_csv": rows}


def golden_run(savedir, prefix=(sys.executable,)) -> dict:
    proc = launch(os.path.join(ROOT, "configs", "demo.yaml"), "DEFAULT.savedir", str(savedir), *ARGS, prefix=prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = {dp for dp, _, files in os.walk(savedir) if "results.json" in files}
    return fingerprint(run_dir)


def _recorded(kind: str) -> dict:
    with open(GOLDEN) as f:
        return json.load(f)[kind]


def test_one_process_reproduces_the_golden_run(tmp_path):
    assert golden_run(tmp_path) == _recorded("one_process")


@pytest.mark.slow
def test_two_ranks_under_torchrun_reproduce_the_golden_run(tmp_path):
    assert golden_run(tmp_path, TORCHRUN) == _recorded("two_ranks")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        recorded = {"one_process": golden_run(one), "two_ranks": golden_run(two, TORCHRUN)}
    with open(GOLDEN, "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"recorded {GOLDEN}")
