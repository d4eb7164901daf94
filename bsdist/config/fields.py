"""What one config key is: a `Field` (default, kind, allowed values, check, help), declared as a dataclass field
with `option`, and the checks several sections share. Free of torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}


@dataclass(frozen=True)
class Field:
    default: Any
    kind: str  # int, float, str, bool, list, choice, auto_bool
    help: str
    choices: tuple = ()
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None
    resumable: bool = False  # may differ between a run and its resumption: changes speed or logging, never results


def option(default, help: str, *, kind: str | None = None, choices=(), nullable: bool | None = None,
           check=None, resumable: bool = False):
    """A dataclass field carrying its Field; the kind follows from the default unless given."""
    if kind is None:
        kind = "choice" if choices and not isinstance(default, list) else KINDS[type(default)]
    meta = Field(default, kind, help, choices, default is None if nullable is None else nullable, check, resumable)
    if isinstance(default, list):  # held as a tuple, so the config stays immutable
        return dataclasses.field(default=tuple(default), metadata={"field": meta})
    return dataclasses.field(default=default, metadata={"field": meta})


def section(cls):
    return dataclasses.field(default_factory=cls, metadata={"section": cls})


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def at_least_one(v):
    return None if v >= 1 else "must be >= 1"


def fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"
