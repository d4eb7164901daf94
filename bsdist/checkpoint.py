"""Checkpoints: written to a temporary file and renamed into place, so a reader never sees half of one."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from bsdist.errors import BsdistError

PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state: dict) -> dict:
    """Drop DDP / torch.compile prefixes so a checkpoint loads into a plain model."""
    def strip(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        return key
    return {strip(k): v for k, v in state.items()}


def save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BsdistError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:80]}); "
                          "remove it to start the run again, or restore it from a copy") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
