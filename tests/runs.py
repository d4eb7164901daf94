"""Helpers the end-to-end tests share: interrupting a run at a checkpoint, fingerprints of a run
directory, a clean environment for launching processes, launch.py itself, and a small sweep file."""

import glob
import hashlib
import os
import subprocess
import sys

import yaml

from bsdist.distributed import LAUNCH_VARIABLES
from bsdist.output import RunOutput
from bsdist.train import main
from paths import ROOT



class Interrupted(Exception):
    pass


def run_until(monkeypatch, cfg, stop_after):
    """Run main(cfg) and kill it (by an exception) right after saving the checkpoint `stop_after(name, state)` picks."""
    original = RunOutput.save_checkpoint

    def save_then_maybe_die(self, state, names):
        original(self, state, names)
        if any(stop_after(name, state) for name in names):
            raise Interrupted
    monkeypatch.setattr(RunOutput, "save_checkpoint", save_then_maybe_die)
    try:
        main(cfg)
    except Interrupted:
        pass
    else:
        raise AssertionError("the run finished before the chosen checkpoint")
    finally:
        monkeypatch.setattr(RunOutput, "save_checkpoint", original)


def snapshot(directory):
    """Path -> sha256 of every file under directory."""
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p)}


def clean_env(**extra):
    """This process's environment without a launcher's rank variables (a child starts its own group)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(extra)
    return env


def launch(*args, prefix=(sys.executable,), timeout=600, env=None) -> subprocess.CompletedProcess:
    """launch.py with these arguments (under `prefix`, torchrun say), run from the repository root, with `env`
    on top of a clean environment."""
    return subprocess.run([*prefix, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT, env=clean_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def write_sweep(tmp_path, root, **changes) -> str:
    """A 2 x 2 sweep (imbalance factor x loss) of one-epoch CPU runs on the CIFAR-10 files under root."""
    spec = {
        "base": os.path.join(ROOT, "configs", "cifar10lt_ce.yaml"),
        "overrides": {"DEFAULT.savedir": str(tmp_path / "runs"), "DATASET.datadir": root, "DATASET.download": False,
                      "TRAIN.epochs": 1, "DATASET.batch_size": 50, "DATASET.test_batch_size": 103,
                      "DATASET.num_workers": 0, "TRAIN.device": "cpu", "TRAIN.compile": False},
        "axes": {"DATASET.imbalance_factor": [1, 2], "LOSS.name": ["CrossEntropyLoss", "BalancedSoftmax"]},
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)
