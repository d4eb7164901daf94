"""The DEFAULT section: seed and where runs go."""

from __future__ import annotations

from dataclasses import dataclass

from bsdist.config.fields import non_negative, option


@dataclass(frozen=True)
class Default:
    seed: int = option(0, "seed of model initialisation, shuffling and augmentation; runs with several seeds share one "
                          "long-tailed subset (DATASET.split_seed)", check=non_negative)
    savedir: str = option("./results", "root of run directories: <savedir>/<dataset>/<model>/<exp_name>")
    exp_name: str | None = option(None, "run name; null derives <loss>-<imbalance_type>-IF_<factor> (a stage 2: "
                                        "<stage-1 run>-cRT-<loss>)", kind="str")
