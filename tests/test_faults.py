"""Faults caused for real: interruptions mid-epoch, signals, a killed worker, non-finite loss, bad disks."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tiny_model
from runs import clean_env, run_until
from bsdist import BsdistError, checkpoint, config
from bsdist.losses import BalancedSoftmax
from bsdist.train import main
from paths import ROOT

tiny_model.register()
DEMO = ["TRAIN.epochs", "3", "DATASET.val_per_cls", "0", "SCHEDULER.params.warmup_epochs", "0",
        "TRAIN.ckpt_every_steps", "2", "TRAIN.log_interval", "2", "OPTIMIZER.momentum", "0.9", "TRAIN.resume", "auto"]


def demo_cfg(savedir, *overrides):
    return config.validate(config.load(os.path.join(ROOT, "configs/demo.yaml"), [
        "DEFAULT.savedir", str(savedir), "TRAIN.device", "cpu", "TRAIN.compile", "false", *DEMO, *overrides]))


def weights(cfg_or_dir):
    directory = cfg_or_dir if isinstance(cfg_or_dir, str) else config.run_dir(cfg_or_dir)
    return checkpoint.load(os.path.join(directory, "last.pt"))["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, monkeypatch):
    straight = main(demo_cfg(tmp_path / "straight", "MODEL.name", "tiny"))
    cfg = demo_cfg(tmp_path / "interrupted", "MODEL.name", "tiny")
    # inside the second epoch, after 4 of its 7 steps
    run_until(monkeypatch, cfg, lambda name, state: state["epoch"] == 1 and state["progress"]["step"] == 4)
    resumed = main(cfg)
    assert_same_weights(weights(demo_cfg(tmp_path / "straight", "MODEL.name", "tiny")), weights(cfg))
    assert resumed["last"]["confusion"] == straight["last"]["confusion"]
    with open(os.path.join(config.run_dir(cfg), "metrics.csv")) as f:
        rows = f.read().splitlines()
    straight_dir = config.run_dir(demo_cfg(tmp_path / "straight", "MODEL.name", "tiny"))
    straight_rows = open(os.path.join(straight_dir, "metrics.csv")).read().splitlines()
    # the epoch's training loss and accuracy count every image once, across the interruption
    for column in (2, 3):  # train_loss, train_acc
        values = [float(r.split(",")[column]) for r in rows[1:]]
        assert values == pytest.approx([float(r.split(",")[column]) for r in straight_rows[1:]], rel=1e-9)


def test_ldam_drw_resumed_after_its_re_weighting_began_ends_as_a_straight_run(tmp_path, monkeypatch):
    """DRW's switch reads only the epoch the Trainer keeps, so a run stopped inside an epoch after it resumes
    with the same class weights, and ends with the straight run's weights."""
    ldam = ["MODEL.name", "tiny_fc", "MODEL.classifier", "cosine", "LOSS.name", "LDAMLoss", "LOSS.drw_epoch", "1"]
    main(demo_cfg(tmp_path / "straight", *ldam))
    cfg = demo_cfg(tmp_path / "interrupted", *ldam)
    run_until(monkeypatch, cfg, lambda name, state: state["epoch"] == 2 and state["progress"]["step"] == 4)
    main(cfg)
    assert_same_weights(weights(demo_cfg(tmp_path / "straight", *ldam)), weights(cfg))
    assert "fc.bias" not in weights(cfg)  # the cosine classifier trained


def launch(args, prefix=(sys.executable,), extra_env=None, **kwargs):
    return subprocess.Popen([*prefix, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                            env=clean_env(**(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def run_args(savedir):
    return ["configs/demo.yaml", "DEFAULT.savedir", str(savedir), "TRAIN.device", "cpu", *DEMO]


@pytest.mark.slow
def test_sigterm_stops_at_a_safe_point_and_the_resumed_run_matches(tmp_path):
    reference = launch(run_args(tmp_path / "straight"))
    out, err = reference.communicate(timeout=300)  # communicate, not wait: a full pipe would block the child
    assert reference.returncode == 0, err[-3000:]
    proc = launch(run_args(tmp_path / "stopped"))
    run = str(tmp_path / "stopped" / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    wait_for(os.path.join(run, "last.pt"), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal 15" in err and "TRAIN.resume auto" in err
    assert not os.path.exists(os.path.join(run, "results.json"))
    resumed = launch(run_args(tmp_path / "stopped"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    straight_run = str(tmp_path / "straight" / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    assert_same_weights(weights(straight_run), weights(run))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_worker_at_one_safe_point(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = lambda d: [*run_args(d), "DATASET.batch_size", "64"]  # noqa: E731
    reference = launch(args(tmp_path / "straight"), prefix=torchrun)
    out, err = reference.communicate(timeout=400)
    assert reference.returncode == 0, err[-3000:]
    proc = launch(args(tmp_path / "stopped"), prefix=torchrun)
    run = str(tmp_path / "stopped" / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    wait_for(os.path.join(run, "last.pt"), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by signal 15" in err, (proc.returncode, out[-2000:], err[-3000:])
    assert not os.path.exists(os.path.join(run, "results.json"))
    resumed = launch(args(tmp_path / "stopped"), prefix=torchrun)
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-3000:]
    straight_run = str(tmp_path / "straight" / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    assert_same_weights(weights(straight_run), weights(run))


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if ppid == pid and "launch.py" in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_restarts_and_ends_like_an_uninterrupted_run(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "1")
    args = lambda d: [*run_args(d), "DATASET.batch_size", "64"]  # noqa: E731
    reference = launch(args(tmp_path / "straight"), prefix=torchrun)
    out, err = reference.communicate(timeout=400)
    assert reference.returncode == 0, err[-3000:]
    proc = launch(args(tmp_path / "killed"), prefix=torchrun)  # torchrun's shared store, as it comes (pytorch#135712)
    run = str(tmp_path / "killed" / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    wait_for(os.path.join(run, "last.pt"), proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out  # the restarted group continued from the checkpoint
    straight_run = str(tmp_path / "straight" / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    assert_same_weights(weights(straight_run), weights(run))
    with open(os.path.join(run, "results.json")) as f, open(os.path.join(straight_run, "results.json")) as g:
        assert json.load(f)["last"]["confusion"] == json.load(g)["last"]["confusion"]


def poison_fifth_loss(monkeypatch):
    original, calls = BalancedSoftmax.forward, []

    def forward(self, logits, target):
        calls.append(1)
        loss = original(self, logits, target)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(BalancedSoftmax, "forward", forward)


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(tmp_path, monkeypatch):
    poison_fifth_loss(monkeypatch)
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny")
    with pytest.raises(BsdistError, match=r"non-finite loss at epoch 1 step 5 .*last.pt \(epoch 1 step 4\) "
                                          r"is the last good point.*TRAIN.nonfinite skip"):
        main(cfg)
    kept = checkpoint.load(os.path.join(config.run_dir(cfg), "last.pt"))
    assert (kept["epoch"], kept["progress"]["step"]) == (0, 4)  # the last good checkpoint, loadable
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_non_finite_loss_before_any_checkpoint_leaves_the_run_name_free(tmp_path, monkeypatch):
    poison_fifth_loss(monkeypatch)
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny", "TRAIN.ckpt_every_steps", "0", "TRAIN.resume", "false")
    with pytest.raises(BsdistError, match=r"non-finite loss at epoch 1 step 5 .*no checkpoint was written, so the next "
                                          r"attempt starts afresh"):
        main(cfg)
    assert not os.path.exists(os.path.join(config.run_dir(cfg), "last.pt"))
    monkeypatch.undo()
    retry = demo_cfg(tmp_path, "MODEL.name", "tiny", "TRAIN.ckpt_every_steps", "0", "TRAIN.resume", "false",
                     "OPTIMIZER.lr", "0.01")
    assert main(retry)["last"]["epoch"] == 3  # same name, another lr: nothing to resume, nothing refused
    assert config.validate(config.load(os.path.join(config.run_dir(retry), "config.yaml"))) == retry


def test_a_non_finite_loss_can_skip_the_step(tmp_path, monkeypatch):
    poison_fifth_loss(monkeypatch)
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny", "TRAIN.nonfinite", "skip")
    results = main(cfg)
    assert results["last"]["epoch"] == 3
    assert all(torch.isfinite(v).all() for v in weights(cfg).values())
    with open(os.path.join(config.run_dir(cfg), "log.txt")) as f:
        assert ("1 step(s) with a non-finite loss on some rank skipped, the first at epoch 1 step 5 (global step 5)"
                in f.read())


def test_an_unwritable_run_directory_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BsdistError, match="cannot be written.*DEFAULT.savedir"):
        main(demo_cfg(blocker, "MODEL.name", "tiny"))


def test_a_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(BsdistError, match="MiB free, less than"):
        main(demo_cfg(tmp_path, "MODEL.name", "tiny"))
    assert not os.path.exists(os.path.join(config.run_dir(demo_cfg(tmp_path, "MODEL.name", "tiny")), "last.pt"))


def _hanging_peer_worker(raw_cfg):
    import time as clock

    import bsdist.tally as tally
    from bsdist.distributed import world_size_from_env
    tiny_model.register()
    calls, original = [], tally.all_reduce_max

    def stall_rank_1(tensor):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 10:  # in the second epoch: the steady timeout applies
            clock.sleep(8)
        return original(tensor)
    tally.all_reduce_max = stall_rank_1  # every optimiser step's
    started = clock.time()
    try:
        main(config.validate(raw_cfg, world_size_from_env()))
        return {"error": None}
    except BsdistError as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": clock.time() - started}


@pytest.mark.slow
def test_a_hanging_peer_stops_the_others_within_the_timeout(cifar10_root, tmp_path):
    from spawn import run_ranks
    raw = config.load(None, ["DATASET.name", "CIFAR10LT", "DATASET.datadir", cifar10_root,
                             "DEFAULT.savedir", str(tmp_path), "DATASET.imbalance_factor", "1",
                             "DATASET.batch_size", "32", "DATASET.num_workers", "0", "TRAIN.device", "cpu",
                             "TRAIN.compile", "false", "TRAIN.mixed_precision", "no", "MODEL.name", "tiny",
                             "TRAIN.epochs", "3", "TRAIN.dist_timeout_s", "3", "TRAIN.dist_startup_timeout_s", "120"])
    results, errors = run_ranks(_hanging_peer_worker, 2, raw, timeout=90)
    assert not errors, errors
    rank0 = results[0]
    assert rank0["error"] and rank0["error"].startswith("PeerFailure: rank 0: a collective failed"), rank0
    assert "TRAIN.resume auto" in rank0["error"]
    assert rank0["seconds"] < 20  # the tightened timeout, not the 120 s start-up one


def test_a_full_disk_during_a_checkpoint_write_stops_the_run_keeping_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny")
    real_save, saves = torch.save, []

    def disk_fills_at_the_third_write(obj, f, *args, **kwargs):
        if not isinstance(f, io.BytesIO):  # a checkpoint file, not torch's own in-memory pickling
            saves.append(f)
            if len(saves) >= 3:
                raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_fills_at_the_third_write)
    with pytest.raises(BsdistError, match=r"last.pt could not be written \(No space left on device; \d+ MiB free"
                                          r".*previous checkpoint is kept"):
        main(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    kept = checkpoint.load(os.path.join(config.run_dir(cfg), "last.pt"))
    assert (kept["epoch"], kept["progress"]["step"]) == (0, 4)  # the second write (step 4 of epoch 1), whole
    # last.pt's file got its second name before the failed write began
    assert checkpoint.load(os.path.join(config.run_dir(cfg), "last.prev.pt"))["progress"]["step"] == 4
    assert sorted(os.listdir(config.run_dir(cfg))) == sorted(
        ["config.yaml", "runtime.json", "last.pt", "last.pt.sha256", "last.prev.pt", "last.prev.pt.sha256", "log.txt",
         "run.lock",
         # the failed write is learnt at a sync point after it; the epoch's row may come first
         *[f for f in os.listdir(config.run_dir(cfg)) if "tfevents" in f or f == "metrics.csv"]])


@pytest.mark.slow
def test_ten_worker_kills_in_a_row_under_plain_torchrun_each_resume(tmp_path):
    """Restarts need no TORCH_DISABLE_SHARE_RDZV_TCP_STORE: every attempt's group has keys of its own."""
    kills = 10
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", str(kills))
    proc = launch([*run_args(tmp_path), "DATASET.batch_size", "64", "TRAIN.epochs", "12",
                   "TRAIN.ckpt_every_steps", "1"], prefix=torchrun)
    run = str(tmp_path / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    log, last = os.path.join(run, "log.txt"), os.path.join(run, "last.pt")
    killed_at = 0.0
    try:
        for kill in range(kills):
            deadline = time.time() + 240
            # the group of this attempt has resumed (after the first kill) and written a checkpoint of its own
            while not (os.path.exists(log) and open(log).read().count("resumed from") == kill and os.path.exists(last)
                       and os.path.getmtime(last) > killed_at):
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.time() < deadline, f"attempt {kill} never resumed and saved"
                time.sleep(0.05)
            workers = children(proc.pid)
            assert len(workers) == 2, workers
            os.kill(workers[kill % 2], signal.SIGKILL)
            killed_at = time.time()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failed test leaves no worker behind
            for worker in children(proc.pid):
                os.kill(worker, signal.SIGKILL)
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert open(log).read().count("resumed from") == kills
    with open(os.path.join(run, "results.json")) as f:
        assert json.load(f)["last"]["epoch"] == 12
