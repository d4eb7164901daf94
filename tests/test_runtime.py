"""The run's frame and its machine settings: resolve_runtime on this machine, and one session for train.main and
--evaluate (the process group, the output, the way a run ends)."""

import json

import pytest
import torch
import torch.distributed as dist

from bsdist import config
from bsdist.errors import PeerFailure
from bsdist.session import session


def demo(tmp_path, *overrides):
    return config.validate(config.load("configs/demo.yaml", [
        "DEFAULT.savedir", str(tmp_path), "TRAIN.device", "cpu", "TRAIN.compile", "auto", *overrides]))


def test_the_runtime_resolves_the_machine_s_settings_once_and_serialises(tmp_path):
    from bsdist.data import build_data
    from bsdist.runtime import resolve_runtime
    cfg = demo(tmp_path, "TRAIN.mixed_precision", "auto")
    with session(cfg, str(tmp_path)) as (env, out):
        data = build_data(cfg, env)
        runtime = resolve_runtime(cfg, env, data.train)
        evaluation = resolve_runtime(cfg, env)
    assert (runtime.device, runtime.world_size, runtime.precision, runtime.compile) == (torch.device("cpu"), 1, "no",
                                                                                         False)
    assert runtime.amp_dtype is None and not runtime.sync_bn and "one process" in runtime.sync_bn_reason
    assert "gloo" in runtime.backend and runtime.loader.startswith("device: ")  # the digits live on the device
    assert evaluation.loader == "" and "evaluation only" in evaluation.describe()
    assert json.loads(json.dumps(runtime.to_dict()))["device"] == "cpu"


def test_a_failed_collective_ends_any_session_in_one_line_and_leaves_no_process_group(tmp_path):
    """--evaluate shares the run's frame, so a dead peer there is the same PeerFailure line."""
    cfg = demo(tmp_path)
    with pytest.raises(PeerFailure, match=r"^rank 0: a collective failed \(\[gloo/transport\] Connection closed by "
                                          r"peer\): another process died .* continue with TRAIN\.resume auto$"):
        with session(cfg, str(tmp_path)):
            raise RuntimeError("[gloo/transport] Connection closed by peer\nmore lines")
    assert not dist.is_initialized()
    with pytest.raises(ValueError):  # any other error passes through unchanged
        with session(cfg, str(tmp_path)):
            raise ValueError("not a collective")
    assert not dist.is_initialized()
