"""Checkpoints: written atomically (bsdist.atomic), so a reader never sees half of one; written on a
background thread from a host copy; read without unpickling code."""

from __future__ import annotations

import os
import random
import shutil
import threading

import numpy as np
import torch

from bsdist.atomic import write_atomic
from bsdist.errors import BsdistError


def save_atomic(obj, path: str) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


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

    def save(self, state: dict, paths: list[str]) -> None:
        host = to_host(state)
        self.wait(raise_error=False)  # one write at a time, in order
        if self.error is None:
            self.thread = threading.Thread(target=self._write, args=(host, paths), name="checkpoint-writer")
            self.thread.start()

    def _write(self, state: dict, paths: list[str]) -> None:
        path = paths[0]
        try:
            save_atomic(state, path)
            for path in paths[1:]:  # the same state: a second name for the same file (best.pt beside last.pt)
                link_atomic(paths[0], path)
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


def load(path: str) -> dict:
    """A checkpoint, read without unpickling code (weights_only): one from someone else cannot run anything."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
