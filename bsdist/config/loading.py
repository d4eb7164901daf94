"""The raw config: the field table's defaults, a YAML file on top of them, `KEY.SUB value` overrides on top
of those, as nested dicts; and the way back from a validated Config to YAML."""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any

import yaml

from bsdist.config.schema import FIELDS, Config
from bsdist.errors import BsdistError


def defaults() -> dict:
    """The raw (unvalidated) config of the defaults: nested dicts, as YAML holds it."""
    raw: dict = {}
    for key, f in FIELDS.items():
        _set(raw, key, copy.deepcopy(f.default))
    return raw


def _unknown_key(key: str) -> BsdistError:
    near = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else "; run `python -m bsdist.config` to list the keys"
    return BsdistError(f"unknown config key {key}{hint}")


def _set(raw: dict, key: str, value: Any) -> None:
    if key not in FIELDS:
        raise _unknown_key(key)
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def lookup(raw: dict, key: str, missing: Any = None) -> Any:
    node = raw
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return missing
        node = node[p]
    return node


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key (`TRAIN.epochs`), for code that names keys as data."""
    node = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return node


def to_dict(cfg: Config) -> dict:
    """The nested dict YAML and checkpoints hold (tuples as lists)."""
    raw: dict = {}
    for key in FIELDS:
        value = get(cfg, key)
        _set(raw, key, list(value) if isinstance(value, tuple) else value)
    return raw


def _flatten(tree: dict, prefix: str = "", where: str = "") -> dict:
    """Dotted keys of a YAML tree; a mapping under a leaf key (or a value under a section) is an error."""
    flat = {}
    if not isinstance(tree, dict):
        raise BsdistError(f"{where or 'config'} must be a mapping of sections, got {type(tree).__name__}")
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in FIELDS:
            flat[key] = value
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in FIELDS):
            flat.update(_flatten(value, key + ".", where))
        else:
            raise _unknown_key(key)
    return flat


def read_yaml(path: str, what: str, example: str):
    """The parsed YAML file (an empty file is {}), or one error naming the file and the problem."""
    if not os.path.isfile(path):
        raise BsdistError(f"{what} {path} does not exist; pass a YAML file such as {example}")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise BsdistError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def load(path: str | None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """Defaults (or `base`), then the YAML file, then `KEY.SUB value` pairs (values parsed as YAML): the raw
    config, not yet validated."""
    raw = copy.deepcopy(base) if base is not None else defaults()
    if path is not None:
        tree = read_yaml(path, "config file", "configs/demo.yaml")
        for key, value in _flatten(tree, where=path).items():
            _set(raw, key, value)
    if len(overrides) % 2:
        raise BsdistError(f"override {overrides[-1]} has no value; overrides come in pairs: KEY.SUB value")
    for key, text in zip(overrides[::2], overrides[1::2]):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set(raw, key, value)
    return raw


def upgrade(saved: dict) -> dict:
    """A config.yaml written by an earlier bsdist, with the keys added since set to what that version did:
    the field's `legacy` value where that differs from today's default, the default otherwise (a key's
    default is chosen to keep what runs did before it existed)."""
    if not isinstance(saved, dict):
        return saved
    upgraded = copy.deepcopy(saved)
    for key, f in FIELDS.items():
        if lookup(saved, key, missing=_MISSING) is _MISSING:
            _set(upgraded, key, f.legacy(saved) if f.legacy else copy.deepcopy(f.default))
    return upgraded


_MISSING = object()


def changed_keys(old: Config, new: Config) -> list[str]:
    """Keys whose values differ between two validated configs, ignoring those a resume may change."""
    return [k for k, f in FIELDS.items() if not f.resumable and get(old, k) != get(new, k)]


def dump(cfg: Config | dict) -> str:
    return yaml.safe_dump(to_dict(cfg) if isinstance(cfg, Config) else cfg, sort_keys=False, default_flow_style=False)


def reference_markdown() -> str:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, f in FIELDS.items():
        default = yaml.safe_dump(f.default, default_flow_style=True).strip().removesuffix("...").strip()
        allowed = f" ({', '.join(f.choices)})" if f.choices and f.kind == "choice" else ""
        rows.append(f"| `{key}` | `{default}` | {f.help}{allowed} |")
    return "\n".join(rows)


def default_yaml() -> str:
    return "# Generated by `python -m bsdist.config`: every key with its default.\n" + dump(defaults())
