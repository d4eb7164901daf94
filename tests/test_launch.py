"""launch.py as users run it: plain python and torchrun, in subprocesses with timeouts."""

import glob
import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bsdist import cli
from cifar_files import write_cifar
from runs import clean_env, launch
from paths import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.slow
def test_torchrun_two_processes_trains_and_writes_tensorboard_once(tmp_path):
    proc = launch("configs/demo.yaml", "DEFAULT.savedir", str(tmp_path), "TRAIN.epochs", "2",
                   "SCHEDULER.params.warmup_epochs", "0", "TRAIN.log_interval", "2",
                  prefix=(*TORCHRUN, "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10"
    assert proc.stdout.count("2 process(es) on cpu") == 1  # rank 0 alone prints
    assert proc.stdout.count("epoch 2: val acc") == 1
    events = glob.glob(str(run / "events.out.tfevents.*"))
    assert len(events) == 1  # rank 0 alone writes
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "test/acc", "test/bcr", "test/medium", "test/few"} <= tags
    assert "test/many" not in tags  # no class has more than 100 training images: an empty group is not drawn
    results = json.loads((run / "results.json").read_text())
    assert results["last"]["num_images"] == 500  # every test image once across both ranks
    assert results["best"]["selected_on"] == "val" and acc.Scalars("val/acc")  # the demo selects on validation
    assert acc.Scalars("test/bcr")[-1].value == pytest.approx(results["last"]["bcr"])
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps[-1] == 2 * 6  # 403 images, global batch 64: 6 steps per epoch, as on one process


@pytest.mark.parametrize("args, message", [
    (["TRAIN.epoch", "3"], "unknown config key TRAIN.epoch; did you mean TRAIN.epochs?"),
    (["OPTIMIZER.lr", "-0.1"], "OPTIMIZER.lr must be > 0"),
    (["DATASET.name", "CIFAR10LT", "DATASET.datadir", "/nonexistent"],
     "CIFAR10LT data not found: /nonexistent/cifar-10-batches-py"),
    (["LOSS.name", "Focal"], "LOSS.name must be one of"),
])
def test_a_bad_config_is_one_line_on_stderr_and_creates_nothing(tmp_path, args, message):
    proc = launch("configs/demo.yaml", "DEFAULT.savedir", str(tmp_path / "runs"), *args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = launch("configs/demo.yaml", "DEFAULT.savedir", str(tmp_path), "TRAIN.epoch", "3", "--debug", timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_under_torchrun_an_error_is_printed_once(tmp_path):
    proc = launch("configs/demo.yaml", "DEFAULT.savedir", str(tmp_path), "DATASET.batch_size", "63",
                  prefix=(*TORCHRUN, "--nproc_per_node", "2"), timeout=180)
    assert proc.returncode == 1  # torchrun's status for any failed worker
    message = "error: DATASET.batch_size 63 does not divide by the 2 processes; use a multiple of 2"
    assert proc.stderr.splitlines().count(message) == 1  # printed once, by rank 0; then in torchrun's summary ...
    last_lines = proc.stderr.strip().splitlines()[-3:]
    assert any(line.strip() == f"traceback : {message}" for line in last_lines), last_lines  # ... in the last lines


def test_when_rank_0_fails_to_prepare_the_run_torchrun_s_summary_gives_its_reason_whichever_rank_it_names(tmp_path):
    # offline: the download fails at once (a proxy nobody listens on); rank 1 learns of it from rank 0 and may
    # exit first, and torchrun then stops rank 0 and may name rank 1 alone as the root cause
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    proc = launch("configs/cifar100lt_bs.yaml", "DATASET.datadir", str(tmp_path / "data"), "DEFAULT.savedir",
                  str(tmp_path / "runs"), prefix=(*TORCHRUN, "--nproc_per_node", "2"), timeout=240, env=offline)
    assert proc.returncode == 1
    reason = "error: could not download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert sum(line.startswith(reason) for line in proc.stderr.splitlines()) == 1, proc.stderr  # rank 0's, once
    root_cause = proc.stderr[proc.stderr.rindex("Root Cause"):]
    said = next(line for line in root_cause.splitlines() if line.strip().startswith("traceback : "))
    assert "could not download" in said and "set DATASET.download false" in said, root_cause


def test_without_a_config_a_run_uses_the_defaults_and_says_so_first(tmp_path):
    args = cli.parse_args(["TRAIN.epochs", "3", "--check-data"])
    assert args.config is None and args.overrides == ["TRAIN.epochs", "3"]
    assert cli.parse_args(["configs/demo.yaml", "TRAIN.epochs", "3"]).config == "configs/demo.yaml"
    said = "no CONFIG given: using the defaults (configs/default.yaml's values); choose another config with python " \
           "launch.py CONFIG [KEY.SUB value ...], e.g. configs/demo.yaml"
    cifar10_root = write_cifar(str(tmp_path / "cifar"), 10, train_per_class=100)  # the defaults' factor 100 fits
    proc = launch("DATASET.datadir", cifar10_root, "--check-data", timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].endswith(f"] {said}"), proc.stdout + proc.stderr
    assert lines[1].startswith(f"CIFAR10LT in {cifar10_root}: 10 classes, held in memory (exp profile, factor 100)")
    proc = launch("DEFAULT.savedir", str(tmp_path / "runs"), "DATASET.datadir", str(tmp_path / "data"),
                  prefix=(*TORCHRUN, "--nproc_per_node", "2"), timeout=180)
    assert proc.returncode == 1 and proc.stdout.splitlines()[0].endswith(f"] {said}") and proc.stdout.count(said) == 1
    # the defaults' dataset, not downloaded: rank 0 says so once (and torchrun's summary again)
    missing = f"error: CIFAR10LT data not found: {tmp_path}/data/cifar-10-batches-py"
    assert sum(line.startswith(missing) for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unknown_option_is_named(tmp_path):
    proc = launch("configs/demo.yaml", "--epochs", "3", timeout=60)
    assert proc.returncode == 2 and "unknown option --epochs" in proc.stderr


def test_python_m_bsdist_is_launch_py():
    proc = subprocess.run([sys.executable, "-m", "bsdist", "configs/demo.yaml", "TRAIN.epoch", "1"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 2
            and proc.stderr.strip() == "error: unknown config key TRAIN.epoch; did you mean TRAIN.epochs?")
