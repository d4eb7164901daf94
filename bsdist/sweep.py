"""A grid of runs from one sweep file, restartable at any point.

    base: ../cifar10lt_ce.yaml           # the config every run starts from (relative to this file)
    overrides: {TRAIN.epochs: 50}        # optional: set for every run
    axes:                                # every combination of these values is one run
      DATASET.name: [CIFAR10LT, CIFAR100LT]
      DATASET.imbalance_factor: [1, 10, 50, 100, 200]
      LOSS.name: [CrossEntropyLoss, BalancedSoftmax]
    exclude:                             # combinations matching every key of an entry are skipped
      - {DATASET.imbalance_factor: 1, LOSS.name: BalancedSoftmax}

Every run is validated before the first starts, with TRAIN.resume auto: started again, a sweep skips
finished runs and resumes unfinished ones from their last checkpoint. bsdist.local runs them on this
machine; with --slurm they go to SLURM as one job array instead (bsdist.slurm.submit_sweep).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass

from bsdist import config
from bsdist.config import Config
from bsdist.data import prepare
from bsdist.errors import BsdistError
from bsdist.output import LOG
from bsdist.rundir import finished_results, resume_checkpoint, stage1_checkpoint
from bsdist.runlock import describe, holder_of

SWEEP_KEYS = {"base", "overrides", "axes", "exclude"}


@dataclass
class Run:
    label: str
    tokens: list[str]  # KEY.SUB value pairs after the base config
    cfg: Config  # validated

    @property
    def run_dir(self) -> str:
        return config.run_dir(self.cfg)

    @property
    def uses_gpus(self) -> bool:
        return self.cfg.TRAIN.device != "cpu"  # auto trains on the GPUs it is given, if any

    @property
    def log_path(self) -> str:
        return self.run_dir + ".log"  # beside the run directory, which the run itself creates


def _mapping(value, what: str, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BsdistError(f"{path}: {what} must be a mapping of KEY.SUB: value, got {type(value).__name__}")
    return value


# Keys a run directory already shows: <savedir>/<dataset>/<model>/<exp_name>, the derived exp_name naming the loss
# and the imbalance. Other axes (seeds, learning rates, ...) add -<key>_<value> to exp_name, so no two runs collide.
SHOWN_BY_PATH = ("DEFAULT.savedir", "DATASET.name", "MODEL.name")
SHOWN_BY_DERIVED_NAME = ("LOSS.name", "DATASET.imbalance_type", "DATASET.imbalance_factor")


def load_sweep(path: str, world_size: int = 1, device_here: bool = True, overrides: list[str] = (),
               seeds: list[int] | None = None) -> tuple[str, list[Run]]:
    """(base config path, validated runs in grid order). `overrides` (KEY.SUB value pairs from the command
    line) apply to every run, after the sweep file's; `seeds` adds DEFAULT.seed as an axis. Raises
    BsdistError on any bad run."""
    spec = config.read_yaml(path, "sweep file", "configs/sweeps/demo.yaml")
    if not isinstance(spec, dict) or set(spec) - SWEEP_KEYS or "base" not in spec:
        raise BsdistError(f"sweep file {path} must be a mapping with base (and optional overrides, axes, exclude); "
                          f"found {sorted(spec) if isinstance(spec, dict) else type(spec).__name__}")
    spec["base"] = os.path.normpath(os.path.join(os.path.dirname(path), spec["base"]))
    return expand(spec, path, world_size, device_here, overrides, seeds)


def load_runs(sweep: str | None, config_path: str | None, seeds: list[int] | None, world_size: int = 1,
              device_here: bool = True, overrides: list[str] = ()) -> tuple[str, list[Run]]:
    """The runs of a sweep file, or of one config trained with each of `seeds` (`launch.py CONFIG --seeds 0 1 2`)."""
    if sweep is not None:
        return load_sweep(sweep, world_size, device_here, overrides, seeds)
    return expand({"base": config_path}, config_path, world_size, device_here, overrides, seeds)


def expand(spec: dict, path: str, world_size: int, device_here: bool, overrides: list[str],
           seeds: list[int] | None) -> tuple[str, list[Run]]:
    base = spec["base"]
    file_overrides = _mapping(spec.get("overrides"), "overrides", path)
    axes = _mapping(spec.get("axes"), "axes", path)
    if seeds:
        if "DEFAULT.seed" in axes:
            raise BsdistError(f"{path} already has a DEFAULT.seed axis; drop --seeds or the axis")
        axes = {**axes, "DEFAULT.seed": list(seeds)}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise BsdistError(f"{path}: axis {key} must be a non-empty list of values, got {values!r}")
    excludes = spec.get("exclude") or []
    if not isinstance(excludes, list) or not all(isinstance(e, dict) for e in excludes):
        raise BsdistError(f"{path}: exclude must be a list of mappings such as {{LOSS.name: BalancedSoftmax}}")
    for entry in excludes:
        stray = set(entry) - set(axes)
        if stray:
            raise BsdistError(f"{path}: exclude names {sorted(stray)[0]}, which is not an axis; "
                              "exclude only axis values")

    runs, seen = [], {}
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        if any(all(point[k] == v for k, v in entry.items()) for entry in excludes):
            continue
        label = "/".join(str(v) for v in point.values()) or "base"
        try:
            tokens = _tokens({**file_overrides, **point, "TRAIN.resume": "auto"}, overrides)
            named = config.load(base, tokens)["DEFAULT"]["exp_name"] is not None  # raw: as the user wrote it
            cfg = config.validate(config.load(base, tokens), world_size, device_here)
            suffix = _name_suffix(point, named, cfg.DEFAULT.exp_name)
            if suffix:
                tokens += ["DEFAULT.exp_name", cfg.DEFAULT.exp_name + suffix]
                cfg = config.validate(config.load(base, tokens), world_size, device_here)
        except BsdistError as e:
            raise BsdistError(f"{path}: run {label}: {e}") from None
        run = Run(label, tokens, cfg)
        if run.run_dir in seen:
            raise BsdistError(f"{path}: runs {seen[run.run_dir]} and {label} share the run directory {run.run_dir}; "
                              "add DEFAULT.exp_name to the axes or to the overrides of one of them")
        seen[run.run_dir] = label
        runs.append(run)
    if not runs:
        raise BsdistError(f"{path}: the exclusions leave no run")
    return base, runs


def _tokens(values: dict, overrides: list[str]) -> list[str]:
    """KEY.SUB value tokens (JSON is YAML: typed) for the sweep's values then the command line's; a string
    value may name other keys in braces ({DEFAULT.seed}), filled in from the same run's values."""
    merged = {**values, **dict(zip(overrides[::2], overrides[1::2]))}
    tokens = []
    for key, value in values.items():
        if isinstance(value, str) and "{" in value:
            value = _fill(key, value, merged)
        tokens += [key, json.dumps(value)]
    return tokens + list(overrides)


def _fill(key: str, text: str, values: dict) -> str:
    def value_of(match):
        name = match.group(1)
        if name not in values:
            raise BsdistError(f"{key} {text!r} names {{{name}}}, which is not set by the sweep's overrides or "
                              f"axes; add {name} to them" + (" (or pass --seeds)" if name == "DEFAULT.seed" else ""))
        value = values[name]
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return re.sub(r"\{([A-Za-z_]+(?:\.[A-Za-z_]+)+)\}", value_of, text)


def _name_suffix(point: dict, named: bool, exp_name: str) -> str:
    """-<key>_<value> for every axis the run directory does not show already (all but the path's when
    DEFAULT.exp_name is set rather than derived, and any the name holds already, as a stage 2's name
    holds its stage-1 run's); nothing when exp_name is itself an axis."""
    if "DEFAULT.exp_name" in point:
        return ""
    shown = SHOWN_BY_PATH + (() if named else SHOWN_BY_DERIVED_NAME)
    leaves = [k.rsplit(".", 1)[-1] for k in point]
    parts = []
    for key, value in point.items():
        if key in shown:
            continue
        name = key.rsplit(".", 1)[-1] if leaves.count(key.rsplit(".", 1)[-1]) == 1 else key
        text = "+".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) \
            else f"{value:g}" if isinstance(value, float) else str(value)
        part = f"{name}_{re.sub(r'[^A-Za-z0-9_.+-]', '_', text)}"
        if part not in exp_name.split("-"):
            parts.append("-" + part)
    return "".join(parts)


def check_runs(runs: list[Run]) -> None:
    """Stop the sweep before anything starts: data missing (downloaded here, once, where the config allows
    it), a run directory that holds another run, or a stage 2 whose stage-1 run is unfinished or unfit."""
    for cfg in {(r.cfg.DATASET.name, r.cfg.DATASET.datadir): r.cfg for r in runs}.values():
        prepare(cfg)
    for run in runs:
        resume_checkpoint(run.cfg)
        stage1_checkpoint(run.cfg)


def unfinished(runs: list[Run]) -> list[tuple[int, Run]]:
    """(position, run) of the runs still to do; the finished ones, and those another process is running (the
    same sweep started twice), are reported as skipped."""
    return [(i, run) for i, run in enumerate(runs, 1) if not done_or_held(i, run, len(runs))]


def done_or_held(i: int, run: Run, total: int) -> str | None:
    """"finished" or "held" (another process holds its directory now), said in one line, for a run this sweep
    leaves; None for a run to start."""
    if finished_results(run.cfg) is not None:
        LOG.info(f"[{i}/{total}] {run.label}: finished before, skipped ({run.run_dir})")
        return "finished"
    holder = holder_of(run.run_dir)
    if holder is not None:
        LOG.info(f"[{i}/{total}] {run.label}: held by {describe(holder)}, left to it")
        return "held"
    return None


def savedir(runs: list[Run]) -> str:
    """The directory that holds every run of the sweep."""
    return os.path.commonpath([r.cfg.DEFAULT.savedir for r in runs])
