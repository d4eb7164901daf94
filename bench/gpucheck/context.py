"""What a check runs with: its context (device, sizes, the --out folder, the deadline), its outcomes (Skip,
CheckFailed) and the child processes it starts, each ended with everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

# timing first: it puts the repository root on sys.path
from timing import ROOT

from bsdist.distributed import LAUNCH_VARIABLES, DistEnv


class Skip(Exception):
    def __init__(self, reason: str, figures: dict | None = None):
        super().__init__(reason)
        self.figures = figures or {}


class CheckFailed(Exception):
    def __init__(self, detail: str, figures: dict | None = None):
        super().__init__(detail)
        self.figures = figures or {}


def require(condition: bool, detail: str, figures: dict | None = None) -> None:
    if not condition:
        raise CheckFailed(detail, figures)


@dataclass
class Context:
    """One check's process: `sizes` "cuda" or "cpu" (the CUDA sizes can be rehearsed on a CPU), `out` the
    folder everything the check learns goes to, `deadline` (time.time()) by which it must have ended."""

    name: str
    device: str
    sizes: str
    out: str
    deadline: float
    env: DistEnv
    missing: list = field(default_factory=list)  # what preflight found missing (keys of preflight.NEEDS)
    figures: dict = field(default_factory=dict)  # written to <out>/<name>.json as they come (save)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def full_size(self) -> bool:
        return self.sizes == "cuda"

    @property
    def workdir(self) -> str:
        path = os.path.join(self.out, self.name)
        os.makedirs(path, exist_ok=True)
        return path

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, estimate_s: float, what: str, left_out: list) -> bool:
        """Whether `what` (about `estimate_s` seconds) fits in the time left; if not, it is named in `left_out`."""
        if self.left() >= estimate_s:
            return True
        left_out.append(f"{what} (about {estimate_s:.0f} s, {max(self.left(), 0):.0f} s left)")
        return False

    def save(self, status: str = "RUNNING", detail: str = "") -> None:
        """The check's figures so far: what a check cut at the deadline leaves."""
        with open(os.path.join(self.out, f"{self.name}.json"), "w") as f:
            json.dump({"status": status, "detail": detail, "figures": self.figures}, f, indent=2, default=str)


def child_env(extra: dict | None = None) -> dict:
    """This environment without a launcher's rank variables (a child starts its own group), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(extra or {})
    return env


def start_child(command: list, logs: str, env: dict | None = None, own_session: bool = True) -> subprocess.Popen:
    """A child, stdout and stderr to logs.out / .err: in its own session (ended with all it starts by end_child),
    or with `own_session` False in this one, so that ending this process's session ends it too."""
    with open(logs + ".out", "w") as out, open(logs + ".err", "w") as err:
        return subprocess.Popen(command, cwd=ROOT, env=child_env(env), stdout=out, stderr=err,
                                start_new_session=own_session)


END_GRACE_S = 3  # from SIGTERM to SIGKILL: time for torchrun to pass the signal on


def end_child(proc: subprocess.Popen) -> None:
    """End what is left of a child's session (the child, or what it left behind after it exited): SIGTERM first,
    which torchrun passes on to its workers (they run in sessions of their own), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        waited = 0.0
        try:
            os.killpg(proc.pid, sig)
            while sig == signal.SIGTERM and waited < END_GRACE_S:
                proc.poll()  # reaps the child itself, so that an empty session reads as empty
                time.sleep(0.1)
                waited += 0.1
                os.killpg(proc.pid, 0)
        except ProcessLookupError:  # nothing left in the session
            break
    proc.wait()


def last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-600:]
