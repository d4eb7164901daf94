import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bsdist import BsdistError, checkpoint

WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from bsdist.checkpoint import save_atomic
i = 0
while True:
    i += 1
    save_atomic({{"step": i, "weights": torch.full((16, 1024, 1024), float(i))}}, {path!r})
    print(i, flush=True)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = str(tmp_path / "last.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, path=path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        time.sleep(0.15)  # now inside a later write (each takes longer than this)
        os.kill(proc.pid, signal.SIGKILL)
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
    real_save = torch.save

    def half_then_fail(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as handle:
            handle.truncate(10)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"step": 2}, path)
    assert checkpoint.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BsdistError, match="cannot be read.*remove it"):
        checkpoint.load(str(path))


def test_prefixes_of_ddp_and_compile_are_stripped():
    state = {"module._orig_mod.fc.weight": 1, "_orig_mod.module.bn.bias": 2, "conv.weight": 3}
    assert checkpoint.clean_state_dict(state) == {"fc.weight": 1, "bn.bias": 2, "conv.weight": 3}
