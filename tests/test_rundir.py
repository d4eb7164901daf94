"""Where a run starts: rank 0 reads the run directory for every rank, and a checkpoint that does not match
its digest is never loaded (the run falls back to the one before it, or stops)."""

import json
import os
import shutil

import pytest

import tiny_model
from bsdist import BsdistError, checkpoint, config
from bsdist.output import console
from bsdist.train import main
from runs import run_until, snapshot
from spawn import run_ranks
from test_checkpoint import flip_bytes

tiny_model.register()  # every test here, alone or not, trains the tiny model
# end-to-end runs, several with 2 spawned ranks (about 4 minutes together on 2 cores): behind the slow marker
pytestmark = pytest.mark.slow

COMMON = ["TRAIN.epochs", "3", "TRAIN.resume", "auto", "MODEL.name", "tiny"]


def demo_cfg(savedir, *overrides):
    return config.validate(config.load("configs/demo.yaml", [
        "DEFAULT.savedir", str(savedir), "TRAIN.device", "cpu", "TRAIN.compile", "false", "TRAIN.log_interval", "3",
        "SCHEDULER.params.warmup_epochs", "0", *COMMON, *overrides]))


def interrupted_after_epoch_2(monkeypatch, savedir):
    """A demo run stopped right after the checkpoint of its second epoch (as SIGTERM would leave it)."""
    cfg = demo_cfg(savedir)
    run_until(monkeypatch, cfg, lambda name, state: name == "last.pt" and state["epoch"] == 2)
    return cfg, config.run_dir(cfg)


def test_a_damaged_last_checkpoint_is_named_and_the_run_continues_from_the_one_before(tmp_path, monkeypatch, capsys):
    import tiny_model
    tiny_model.register()
    console(0)
    straight = main(demo_cfg(tmp_path / "straight"))
    cfg, run_dir = interrupted_after_epoch_2(monkeypatch, tmp_path / "damaged")
    flip_bytes(os.path.join(run_dir, "last.pt"))  # best.pt may be the same file: damaged with it
    capsys.readouterr()
    resumed = main(cfg)
    said = capsys.readouterr()
    assert f"checkpoint {run_dir}/last.pt does not match its digest" in said.err
    assert f"continuing from the checkpoint before it, {run_dir}/last.prev.pt" in said.err
    assert f"resumed from {run_dir}/last.prev.pt" in said.out
    assert resumed["last"]["confusion"] == straight["last"]["confusion"]  # resuming is exact from any checkpoint
    assert all(checkpoint.verifies(os.path.join(run_dir, name)) for name in ("last.pt", "best.pt"))


def test_when_no_checkpoint_verifies_nothing_is_loaded_and_nothing_changes(tmp_path, monkeypatch):
    import tiny_model
    tiny_model.register()
    cfg, run_dir = interrupted_after_epoch_2(monkeypatch, tmp_path)
    for name in ("last.pt", "last.prev.pt"):
        path = os.path.join(run_dir, name)
        os.truncate(path, os.path.getsize(path) // 2)
    before = snapshot(run_dir)
    with pytest.raises(BsdistError, match=r"last.pt does not match its digest.*no earlier checkpoint verifies either "
                                          r"\(last.prev.pt\), so nothing is loaded") as e:
        main(cfg)
    assert "\n" not in str(e.value)
    assert snapshot(run_dir) == before


def test_a_checkpoint_from_a_run_before_digests_resumes_with_one_warning(tmp_path, monkeypatch, capsys):
    import tiny_model
    tiny_model.register()
    console(0)
    cfg, run_dir = interrupted_after_epoch_2(monkeypatch, tmp_path)
    for name in os.listdir(run_dir):
        if name.endswith(".sha256") or name.startswith("last.prev"):
            os.remove(os.path.join(run_dir, name))
    capsys.readouterr()
    results = main(cfg)
    said = capsys.readouterr()
    assert said.err.count("has no digest") == 1 and f"{run_dir}/last.pt has no digest" in said.err
    assert results["last"]["epoch"] == 3 and checkpoint.recorded_digest(os.path.join(run_dir, "last.pt"))


def _node_worker(savedirs, overrides):
    """A rank of two simulated nodes, each with its own (node-local) DEFAULT.savedir."""
    import tiny_model
    from bsdist.distributed import world_size_from_env
    tiny_model.register()
    rank = int(os.environ["RANK"])
    raw = config.load("configs/demo.yaml", ["DEFAULT.savedir", savedirs[rank], "TRAIN.device", "cpu",
                                            "TRAIN.compile", "false", "SCHEDULER.params.warmup_epochs", "0",
                                            *COMMON, *overrides])
    return main(config.validate(raw, world_size_from_env()))


def test_rank_0_decides_for_every_node_and_a_node_without_its_checkpoint_stops_in_one_line(tmp_path):
    nodes = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    out, errors = run_ranks(_node_worker, 1, nodes, ["TRAIN.epochs", "1"])
    assert not errors, errors
    run0, run1 = (config.run_dir(demo_cfg(node)) for node in nodes)
    # finished on node 0 only: both ranks return its results, and node 1 trains nothing
    results, errors = run_ranks(_node_worker, 2, nodes, ["TRAIN.epochs", "1"])
    assert not errors, errors
    assert results[0] == results[1] == json.loads(json.dumps(out[0])) and not os.path.exists(run1)
    # unfinished on node 0 (results.json gone); node 1 lacks last.pt, then holds a damaged copy
    os.remove(os.path.join(run0, "results.json"))
    results, errors = run_ranks(_node_worker, 2, nodes, ["TRAIN.epochs", "1"])
    assert f"checkpoint {run1}/last.pt cannot be read (No such file or directory)" in errors[1]
    # rank 0 stops with rank 1's reason (issue 28: whichever rank torchrun names, its summary says why)
    assert f"rank 1 failed while preparing the run: checkpoint {run1}/last.pt cannot be read" in errors[0]
    assert not any(results)
    shutil.copytree(run0, run1)
    flip_bytes(os.path.join(run1, "last.pt"), 8)
    checkpoint.write_digest(os.path.join(run1, "last.pt"), checkpoint.file_digest(os.path.join(run1, "last.pt")))
    results, errors = run_ranks(_node_worker, 2, nodes, ["TRAIN.epochs", "1"])
    assert f"checkpoint {run1}/last.pt does not match its digest" in errors[1]  # rank 0's digest, not node 1's
    # rank 0 stops with rank 1's reason
    assert f"rank 1 failed while preparing the run: checkpoint {run1}/last.pt does not match its digest" in errors[0]
    assert not any(results)
