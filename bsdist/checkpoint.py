"""Checkpoints: written atomically (bsdist.atomic), so a reader never sees half of one;
written on a background thread from a host copy; read without unpickling code.

Every checkpoint has its sha256 beside it (last.pt.sha256, in sha256sum's format), taken from the bytes
as they are written and checked against the file read back before the rename; every read checks it
again, so bytes that rot on disk or in a copy are one line naming the file, never silently loaded.
The checkpoint before the latest is kept as last.prev.pt (a second name of the old file, taken before
the new one is written), for a resume to fall back on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
import threading

import numpy as np
import torch

from bsdist.atomic import write_atomic, write_text
from bsdist.errors import BsdistError


DIGEST = ".sha256"  # the digest file's suffix: `sha256sum -c last.pt.sha256` checks a checkpoint by hand too
LOG = logging.getLogger("bsdist")


class _Hashing:
    """A file that hashes what torch.save writes into it, on its way to the disk."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recorded_digest(path: str) -> str | None:
    """The sha256 written beside path when it was saved; None where there is none (a run from before
    bsdist recorded them)."""
    try:
        with open(path + DIGEST) as f:
            return f.read().split()[0]
    except (FileNotFoundError, IndexError):
        return None


def write_digest(path: str, digest: str) -> None:
    write_text(path + DIGEST, f"{digest}  {os.path.basename(path)}\n")


def previous(path: str) -> str:
    """Where the checkpoint before path's latest is kept: last.pt -> last.prev.pt."""
    return path.removesuffix(".pt") + ".prev.pt"


def save_atomic(obj, path: str) -> str:
    """obj to path, atomically, and its digest beside it; returns the digest. The file is read back and
    checked before it replaces the old one, which stays until then."""
    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            torch.save(obj, hashing)
        digest = hashing.sha256.hexdigest()
        if file_digest(tmp) != digest:
            raise OSError(f"{tmp} read back differs from the bytes written to it")
    write_atomic(path, write)
    write_digest(path, digest)
    return digest


def keep_previous(path: str) -> None:
    """path's current file and digest also as previous(path), before a new one replaces it."""
    link_atomic(path, previous(path))
    link_atomic(path + DIGEST, previous(path) + DIGEST)


def verifies(path: str) -> bool:
    """Whether path exists and matches the digest recorded beside it."""
    return os.path.exists(path) and recorded_digest(path) == file_digest(path)


def link_atomic(source: str, path: str) -> None:
    """path becomes another name of source's file, atomically; replacing source later leaves path as it is."""
    write_atomic(path, lambda tmp: os.link(source, tmp))


def to_host(obj):
    """A copy of obj whose tensors are in host memory and no longer shared with training (one device
    synchronisation for all of them on CUDA)."""
    copies = []

    def copy(x):
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":
                return x.detach().clone()
            host = torch.empty_like(x, device="cpu", pin_memory=True)
            copies.append(x.device)
            return host.copy_(x.detach(), non_blocking=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x
    result = copy(obj)
    for device in set(copies):
        torch.cuda.synchronize(device)
    return result


class CheckpointWriter:
    """Writes checkpoints on a background thread, one after another: the caller waits only for the copy
    to host memory, and training (and the ranks waiting for this one) goes on while the file is written.
    A failed write is kept in `error`, for the run to stop at its next agreement point."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.written: set[str] = set()  # the paths whose current file this writer wrote (and verified)

    def save(self, state: dict, paths: list[str]) -> None:
        host = to_host(state)
        self.wait(raise_error=False)  # one write at a time, in order
        if self.error is None:
            self.thread = threading.Thread(target=self._write, args=(host, paths), name="checkpoint-writer")
            self.thread.start()

    def _write(self, state: dict, paths: list[str]) -> None:
        path = paths[0]
        try:
            if path in self.written or verifies(path):  # never a damaged file as the one to fall back on
                keep_previous(path)
            digest = save_atomic(state, path)
            self.written.add(path)
            for path in paths[1:]:  # the same state: a second name for the same file (best.pt beside last.pt)
                link_atomic(paths[0], path)
                write_digest(path, digest)
        except OSError as e:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            self.error = BsdistError(f"checkpoint {path} could not be written ({e.strerror or e}; "
                                     f"{free / 2**20:.0f} MiB free there); the previous checkpoint is kept: free "
                                     "space, then continue with TRAIN.resume auto")
        except BaseException as e:  # noqa: BLE001 - reported by the run at its next agreement point
            self.error = e

    def wait(self, raise_error: bool = True) -> None:
        """Until every write handed over has finished; then raise the first failure, if any."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if raise_error and self.error is not None:
            raise self.error


class Damaged(BsdistError):
    """A checkpoint whose bytes are not those written (or not those rank 0 chose): this rank says so."""

    every_rank_reports = True


def read_verified(path: str, digest: str | None = None) -> tuple[bytes, str]:
    """path's bytes and their sha256, checked against `digest` (else the one recorded beside path); a file
    without any digest is read with one warning line, a mismatch is one error naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Damaged(f"checkpoint {path} cannot be read ({e.strerror or e}); check that it is there and "
                      "readable on every node (DEFAULT.savedir on a shared file system)") from None
    actual, expected = hashlib.sha256(data).hexdigest(), digest or recorded_digest(path)
    if expected is None:
        LOG.warning(f"checkpoint {path} has no digest ({os.path.basename(path)}{DIGEST}: written by a bsdist "
                    "before they were recorded), so it is read unverified")
    elif actual != expected:
        raise Damaged(f"checkpoint {path} does not match its digest {expected[:12]}... ({len(data)} bytes hashing to "
                      f"{actual[:12]}...): it changed after it was written (a damaged disk or copy, a write cut "
                      "short, or another node's file); restore it from a copy, or move it away")
    return data, actual


def load(path: str, digest: str | None = None) -> dict:
    """A checkpoint, verified (read_verified), read without unpickling code (weights_only): one from
    someone else cannot run anything."""
    data, _ = read_verified(path, digest)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:80]
        raise BsdistError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first_line}); "
                          "remove it to start the run again, or restore it from a copy") from None


def rng_state(device: torch.device) -> dict:
    """This process's random generators as tensors and plain values (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(states: list[dict], rank: int, device: torch.device) -> None:
    """Restore this rank's generators from a checkpoint's per-rank list (rank 0's where the checkpoint had
    fewer ranks); the device generator only where both runs train on CUDA, so a checkpoint moves between
    GPU counts and between GPU and CPU."""
    state = states[rank] if rank < len(states) else states[0]
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["device"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
