"""main(cfg): the whole run, the same under python, torchrun and SLURM."""

from __future__ import annotations

import signal
import threading

from bsdist import config
from bsdist.config import Config
from bsdist.distributed import decided_by_main, launched_as_main
from bsdist.rundir import plan_start, resume_checkpoint, stage1_checkpoint
from bsdist.runlock import hold_run_dir
from bsdist.session import session
from bsdist.trainer import Trainer


def main(cfg: Config) -> dict:
    """Train and evaluate as the validated cfg says; return the results written to results.json."""
    with hold_run_dir(config.run_dir(cfg)):  # a second run aimed at this directory stops here, before any write
        return _train(cfg)


def _train(cfg: Config) -> dict:
    if launched_as_main():  # refuses a directory holding another run, or a stage 1 that does not fit, at once
        resume_checkpoint(cfg)
        stage1_checkpoint(cfg)
    with session(cfg, config.run_dir(cfg)) as (env, out):
        start = decided_by_main(env, lambda: plan_start(cfg))  # one view of the run directory: rank 0's
        if start.finished is not None:
            out.info(f"run already finished; results in {config.run_dir(cfg)}/results.json")
            return start.finished
        with StopSignals() as signals:
            return Trainer(cfg, env, out, start, signals).fit()


class StopSignals:
    """SIGTERM / SIGINT / SIGUSR2 ask training to stop at the next sync point with a checkpoint (a
    second SIGINT interrupts at once). The previous handlers come back afterwards: under SLURM that is
    submitit's USR2 handler, which then requeues the job (bsdist.slurm)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self):
        self.received = 0
        self.previous = {}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
