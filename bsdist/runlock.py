"""One run per run directory at a time: rank 0 holds an exclusive lock on <run_dir>/run.lock from before it
writes anything until it exits, and a second run aimed there stops at once, naming the holder.

The lock is an advisory `flock` on the file, held open for the run's life: the kernel releases it when the
holder exits in any way, SIGKILL included. The file's content (JSON) describes the holder (host, pid,
start time, command, launch and attempt) for the messages; it is emptied on an orderly exit, so a
description found under a free lock is that of a run that ended without releasing it, taken over saying so.

A torchrun restart or a SLURM requeue is the same run: its launch (the torchrun run id, the SLURM job id)
matches the holder's and its attempt (the restart count) is later, so it waits (at most `wait_s`) for
its earlier attempt to exit and takes over. Where the file system has no advisory locks the description
alone guards the directory (see `_without_flock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time

from bsdist.distributed import launched_as_main
from bsdist.errors import BsdistError
from bsdist.output import LOG

LOCK_FILE = "run.lock"
# How long a restart waits for its earlier attempt to let go: torchrun has killed it already; a SLURM
# requeue may start while the old job winds down, and a dead NFS client's lock expires with its lease (90 s).
RESTART_WAIT_S = 120.0
# How long a lock held by a process that has not described itself yet (or by what a dead holder left
# running) is waited for before it counts as another run's.
SETTLE_S = 3.0
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
_HELD_FDS: set[int] = set()


class RunDirBusy(BsdistError):
    """Another run holds the run directory; exit status 75 (EX_TEMPFAIL) tells a sweep to leave it to that run."""

    exit_code = 75


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock; closing its copy leaves the lock to the parent
    # alone, so that it is free the moment the holder dies rather than when its orphans notice.
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


def launch_identity() -> tuple[str | None, list[int]]:
    """(the launch this process belongs to, its attempt): the SLURM job, or the torchrun run (by its agent
    where torchrun was given no --rdzv-id), with the restart counts; (None, [0, 0]) for a plain process."""
    attempt = [int(os.environ.get(v) or 0) for v in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")]
    if os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {os.environ['SLURM_JOB_ID']}", attempt
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None, attempt
    if run_id in ("", "none"):  # torchrun's default id, the same for every run: its agent tells runs apart
        return f"torchrun agent {os.getppid()} on {socket.gethostname()}", attempt
    return f"torchrun run {run_id}", attempt


def describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not described itself yet"
    launch = f", {holder['launch']} restart {sum(holder['attempt'])}" if holder.get("launch") else ""
    return f"pid {holder['pid']} on {holder['host']} since {holder['started']}{launch} ({holder['command']})"


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's process still exists; None when it ran on another host (this one cannot tell)."""
    if holder["host"] != socket.gethostname():
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _read(fd: int) -> dict | None:
    """The holder described in the lock file; None while it is empty (free, or a holder yet to write)."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):  # being written
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started", "command"} <= set(holder) else None


def holder_of(run_dir: str) -> dict | None:
    """Who holds run_dir now, or None; opens nothing for writing (a sweep or a submission asks before starting).

    The probe takes a shared lock for an instant: an exclusive lock taken meanwhile waits SETTLE_S for it."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            holder = _read(fd)
            return holder if holder and _alive_here(holder) is not False else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def busy(run_dir: str, holder: dict | None, extra: str = "") -> RunDirBusy:
    """The one line for a run aimed at a directory that holder holds."""
    stop = ("" if not holder else f" (scancel {holder['launch'].split()[-1]})"
            if str(holder.get("launch")).startswith("SLURM") else f" (kill {holder['pid']} on {holder['host']})")
    return RunDirBusy(f"run directory {run_dir} is held by another run: {describe(holder)}{extra}; wait for it to "
                      f"end, choose another DEFAULT.exp_name, or stop it{stop} and start again")


def check_free(run_dir: str) -> None:
    """Refuse, before submitting a job, a directory that another run holds now."""
    holder = holder_of(run_dir)
    if holder is not None:
        raise busy(run_dir, holder)


class RunLock:
    """The lock on one run directory, held by this process between acquire() and release()."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path, self.fd, self.created = run_dir, os.path.join(run_dir, LOCK_FILE), None, None
        self.launch, self.attempt = launch_identity()

    def _own_earlier(self, holder: dict) -> bool:
        return bool(self.launch) and holder.get("launch") == self.launch and holder["attempt"] < self.attempt

    def acquire(self, wait_s: float = RESTART_WAIT_S) -> None:
        self.created = os.path.abspath(self.run_dir)  # the outermost directory this creates, removed if unused
        while not os.path.isdir(os.path.dirname(self.created)) and os.path.dirname(self.created) != self.created:
            self.created = os.path.dirname(self.created)
        if os.path.isdir(self.created):
            self.created = None
        while self.fd is None:
            try:
                os.makedirs(self.run_dir, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise BsdistError(f"run directory {self.run_dir} cannot be written ({e.strerror}); "
                                  "set DEFAULT.savedir to a writable directory") from None
            try:
                previous = self._wait_for_lock(fd, wait_s)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        self.fd = fd
            finally:
                if self.fd is None:  # refused, or the file was removed while this waited (release): again
                    os.close(fd)
        _HELD_FDS.add(fd)
        if previous:
            why = "an earlier attempt of this run" if self._own_earlier(previous) else "it ended without releasing it"
            LOG.info(f"took over {self.path} from {describe(previous)}: {why}")
        payload = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500],
                              "launch": self.launch, "attempt": self.attempt}).encode()
        os.pwrite(fd, payload, 0)  # in place, then cut: a reader sees the old description, or the new one
        os.ftruncate(fd, len(payload))

    def _wait_for_lock(self, fd: int, wait_s: float) -> dict | None:
        """Take the lock; return the description found in the file (a holder that ended without releasing)."""
        started, waiting_said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return _read(fd)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    raise
                return self._without_flock(fd, e)
            holder, waited = _read(fd), time.monotonic() - started
            if holder and self._own_earlier(holder):
                if waited > wait_s:
                    raise busy(self.run_dir, holder, f" (an earlier attempt of this run, there after {wait_s:.0f} s)")
                if not waiting_said:
                    LOG.info(f"waiting up to {wait_s:.0f} s for {describe(holder)}, an earlier attempt of this run, "
                             f"to release {self.path}")
                    waiting_said = True
            elif (holder is None or _alive_here(holder) is False) and waited < SETTLE_S:
                pass  # a holder yet to describe itself, a probe, or what a dead holder left running
            else:
                raise busy(self.run_dir, holder)
            time.sleep(0.1)

    def _without_flock(self, fd: int, error: OSError) -> dict | None:
        """No advisory locks on this file system (some FUSE, Lustre and NFS mounts): the description alone
        guards the directory. What remains: a run whose holder lives, on any host, is refused; two runs
        started at the same moment are not; a holder killed on another host leaves run.lock to delete."""
        holder = _read(fd)
        if holder and not self._own_earlier(holder) and _alive_here(holder) is not False:
            raise busy(self.run_dir, holder, f" (advisory locks do not work here, so {self.path} alone says so: "
                                              "delete it if that run has ended)")
        LOG.warning(f"advisory locks do not work on the file system of {self.run_dir} ({error.strerror}): "
                    f"{LOCK_FILE} alone keeps a second run out, which misses two runs started at the same moment")
        return holder

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD_FDS.discard(self.fd)
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # an orderly end: the next run finds no holder to take over from
            if self.created and os.listdir(self.run_dir) == [LOCK_FILE]:
                # a run refused before writing (a config mistake) leaves no directory behind; whoever opened
                # the file meanwhile sees it gone once it holds the lock, and starts again (acquire)
                os.remove(self.path)
        os.close(self.fd)  # releases the lock
        self.fd = None
        directory = os.path.abspath(self.run_dir)
        while self.created and not os.path.exists(self.path):
            try:
                os.rmdir(directory)  # only while empty: another run may have started there meanwhile
            except OSError:
                break
            if directory == self.created:
                break
            directory = os.path.dirname(directory)


@contextlib.contextmanager
def hold_run_dir(run_dir: str, wait_s: float = RESTART_WAIT_S):
    """Rank 0 holds run_dir for the body; the other ranks write nothing there and hold nothing."""
    if not launched_as_main():
        yield None
        return
    lock = RunLock(run_dir)
    lock.acquire(wait_s)
    try:
        yield lock
    finally:
        lock.release()
