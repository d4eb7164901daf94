import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from bsdist import BsdistError, atomic, checkpoint

WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from bsdist.checkpoint import save_atomic
i = 0
while True:
    i += 1
    state = {{"step": i, "weights": torch.full((16, 1024, 1024), float(i))}}
    print("writing", i, flush=True)
    save_atomic(state, {path!r})
    print("wrote", i, flush=True)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = str(tmp_path / "last.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, path=path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert [proc.stdout.readline().strip() for _ in range(3)] == ["writing 1", "wrote 1", "writing 2"]
        os.kill(proc.pid, signal.SIGKILL)  # inside the second write (64 MB): one complete checkpoint exists
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = checkpoint.load(path)
    assert state["weights"].shape == (16, 1024, 1024)
    assert torch.all(state["weights"] == state["step"])  # one whole checkpoint, never a mix or a prefix


def test_an_interrupted_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save_atomic({"step": 1}, path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"step": 2}, path)
    assert checkpoint.load(path) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "last.pt.sha256"]


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BsdistError, match="cannot be read.*remove it"):
        checkpoint.load(str(path))


class Payload:
    """What a malicious checkpoint could carry: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_is_read_without_running_its_code(tmp_path):
    # the marker lies in tmp_path: one that a regression (or a mutant) left behind must not fail every later run
    path, marker = tmp_path / "last.pt", tmp_path / "pwned"
    torch.save({"model": {}, "extra": Payload(marker)}, path)
    with pytest.raises(BsdistError, match="cannot be read") as e:
        checkpoint.load(str(path))
    assert not marker.exists()
    # the message quotes the reader's error: its type and its first line, cut at 80 characters
    quoted = re.search(r"cannot be read \(UnpicklingError: (.*)\); remove it", str(e.value)).group(1)
    assert quoted.startswith("Weights only load failed.") and len(quoted) == 80


def test_random_states_are_saved_per_rank_and_restored_on_another_world_size(tmp_path):
    import random

    import numpy as np
    cpu = torch.device("cpu")
    states = []
    for rank in range(2):  # two ranks whose generators differ
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        states.append(checkpoint.rng_state(cpu))
    path = str(tmp_path / "last.pt")
    checkpoint.save_atomic({"rng": states}, path)
    loaded = checkpoint.load(path)["rng"]  # weights_only: tensors and plain values only
    for rank, world in ((1, 2), (0, 1), (2, 3), (3, 4)):  # same world size, fewer ranks, more ranks
        checkpoint.set_rng_state(loaded, rank, cpu)
        expected = rank if rank < 2 else 0
        random.seed(expected), np.random.seed(expected), torch.manual_seed(expected)
        want = (random.random(), np.random.rand(), torch.rand(1).item())
        checkpoint.set_rng_state(loaded, rank, cpu)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == want, (rank, world)


def test_a_failed_background_write_keeps_the_old_checkpoint_and_names_the_path_and_free_space(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    writer = checkpoint.CheckpointWriter()
    writer.save({"step": torch.tensor(1)}, [path])
    writer.wait()

    def no_space(obj, f):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    writer.save({"step": torch.tensor(2)}, [path])
    writer.wait(raise_error=False)
    assert writer.error is not None
    message = r"checkpoint .*last.pt could not be written \(No space left on device; \d+ MiB free"
    with pytest.raises(BsdistError, match=message) as e:
        writer.wait()
    free = shutil.disk_usage(tmp_path).free / 2**20
    assert int(str(e.value).split("; ")[1].split(" MiB")[0]) == pytest.approx(free, rel=0.1, abs=2)
    assert checkpoint.load(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.prev.pt.sha256", "last.pt", "last.pt.sha256"]


def test_a_checkpoint_is_a_copy_taken_when_saved(tmp_path):
    weights = torch.zeros(3)
    writer = checkpoint.CheckpointWriter()
    writer.save({"w": weights}, [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    weights += 1  # training goes on while the file is written
    writer.wait()
    for name in ("a.pt", "b.pt"):
        assert torch.equal(checkpoint.load(str(tmp_path / name))["w"], torch.zeros(3))


def test_a_write_after_a_failed_one_is_not_attempted_and_the_first_failure_is_raised(tmp_path, monkeypatch):
    path, real_save = str(tmp_path / "last.pt"), torch.save
    writer = checkpoint.CheckpointWriter()

    def broken(obj, f):
        raise RuntimeError("cannot pickle this state")
    monkeypatch.setattr(torch, "save", broken)
    writer.save({"step": torch.tensor(1)}, [path])
    writer.wait(raise_error=False)
    monkeypatch.setattr(torch, "save", real_save)
    writer.save({"step": torch.tensor(2)}, [path])  # neither raises nor writes: the run stops at its next check point
    with pytest.raises(RuntimeError, match="cannot pickle this state"):
        writer.wait()
    assert os.listdir(tmp_path) == []


def test_a_failed_link_leaves_no_temporary_file(tmp_path):
    checkpoint.save_atomic({"step": 1}, str(tmp_path / "last.pt"))
    (tmp_path / "best.pt").mkdir()  # a directory cannot be replaced by a file
    with pytest.raises(OSError):
        checkpoint.link_atomic(str(tmp_path / "last.pt"), str(tmp_path / "best.pt"))
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt", "last.pt.sha256"]


def test_the_temporary_files_of_interrupted_writes_are_removed(tmp_path):
    for name in ("last.pt", "last.pt.tmp.4242", "best.pt.tmp.7", "config.yaml.tmp.9", "last.pt.sha256.tmp.9",
                 "notes.tmp", "results.json"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(atomic.remove_orphans(str(tmp_path))) == ["best.pt.tmp.7", "config.yaml.tmp.9",
                                                            "last.pt.sha256.tmp.9", "last.pt.tmp.4242"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "notes.tmp", "results.json"]


def test_a_host_copy_keeps_lists_and_tuples():
    t = torch.zeros(2)
    copy = checkpoint.to_host({"rng": [t, (t, 3)], "name": "x"})
    assert type(copy["rng"]) is list and type(copy["rng"][1]) is tuple
    assert copy["rng"][1][1] == 3 and copy["name"] == "x"
    t += 1
    assert torch.equal(copy["rng"][0], torch.zeros(2)) and torch.equal(copy["rng"][1][0], torch.zeros(2))



def flip_bytes(path, count=64):
    """count bytes in the middle of path inverted, as a failing disk or a bad copy would leave them."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(count)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def test_every_checkpoint_has_its_digest_beside_it_and_changed_bytes_are_one_line_naming_the_file(tmp_path):
    path = str(tmp_path / "last.pt")
    digest = checkpoint.save_atomic({"w": torch.arange(10000.0)}, path)
    assert open(path + ".sha256").read() == f"{digest}  last.pt\n"  # sha256sum -c reads it
    assert digest == checkpoint.file_digest(path)
    flip_bytes(path)
    with pytest.raises(checkpoint.Damaged, match=r"checkpoint .*last.pt does not match its digest") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)
    checkpoint.save_atomic({"w": torch.arange(10000.0)}, path)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(checkpoint.Damaged, match="does not match its digest"):
        checkpoint.load(path)


def test_a_checkpoint_from_before_digests_is_read_with_one_warning(tmp_path, capsys):
    from bsdist.output import console
    console(0)
    path = str(tmp_path / "last.pt")
    checkpoint.save_atomic({"step": 3}, path)
    os.remove(path + ".sha256")
    assert checkpoint.load(path) == {"step": 3}
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "has no digest" in warning and "read unverified" in warning


def test_the_writer_keeps_the_checkpoint_before_the_latest_but_never_a_damaged_one(tmp_path):
    last, prev = str(tmp_path / "last.pt"), str(tmp_path / "last.prev.pt")
    writer = checkpoint.CheckpointWriter()
    for step in (1, 2):
        writer.save({"step": torch.tensor(step)}, [last, str(tmp_path / "best.pt")])
        writer.wait()
    assert checkpoint.load(prev)["step"] == 1 and checkpoint.load(last)["step"] == 2
    assert checkpoint.load(str(tmp_path / "best.pt"))["step"] == 2
    flip_bytes(last, 8)  # the next run (a new writer) finds last.pt damaged: last.prev.pt stays as it is
    fresh = checkpoint.CheckpointWriter()
    fresh.save({"step": torch.tensor(3)}, [last])
    fresh.wait()
    assert checkpoint.load(prev)["step"] == 1 and checkpoint.load(last)["step"] == 3
