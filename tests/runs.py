"""Helpers the end-to-end tests share: interrupting a run at a checkpoint, fingerprints of a run
directory, and a clean environment for launching processes."""

import glob
import hashlib
import os

from bsdist.distributed import LAUNCH_VARIABLES
from bsdist.output import RunOutput
from bsdist.train import main



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
