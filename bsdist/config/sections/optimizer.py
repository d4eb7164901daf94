"""The OPTIMIZER and SCHEDULER sections: the optimiser and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from bsdist.config.fields import at_least_one, fraction, non_negative, option, positive, section


@dataclass(frozen=True)
class Optimizer:
    name: str = option("SGD", "optimiser", choices=("SGD",))
    lr: float = option(0.1, "peak learning rate", check=positive)
    momentum: float = option(0.0, "SGD momentum", check=fraction)
    weight_decay: float = option(0.0, "L2 weight decay", check=non_negative)
    nesterov: bool = option(False, "Nesterov momentum (needs momentum > 0)")


@dataclass(frozen=True)
class SchedulerParams:
    t_initial: float | None = option(None, "epochs in the first cosine cycle; null means all epochs after warmup",
                                     kind="float", check=positive)
    t_mult: float = option(1.0, "growth of each cosine cycle (warm restarts)", check=at_least_one)
    eta_min: float = option(1e-5, "lowest learning rate of the cosine schedule", check=non_negative)
    milestones: tuple[int, ...] = option([], "epochs at which multistep multiplies the learning rate by gamma")
    gamma: float = option(0.1, "multistep factor", check=positive)
    warmup_epochs: float = option(0.0, "linear warmup from 0 to lr over this many epochs", check=non_negative)


@dataclass(frozen=True)
class Scheduler:
    sched_name: str = option("cosine_annealing", "learning-rate schedule, stepped every optimiser step",
                             choices=("cosine_annealing", "multistep"))
    params: SchedulerParams = section(SchedulerParams)
