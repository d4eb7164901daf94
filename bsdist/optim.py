"""SGD and a learning-rate schedule stepped once per optimiser step.

Every rank steps the same number of times per epoch (the global step count), so the schedule is
the one a single process would follow, whatever the world size. Schedules are functions of the
fractional epoch: linear warmup, then cosine annealing with warm restarts or multistep decay.
"""

from __future__ import annotations

import math

import torch


class LRFactor:
    """Multiplier of the peak learning rate at a given optimiser step (picklable, so resumable)."""

    def __init__(self, cfg: dict, steps_per_epoch: int):
        s, p = cfg["SCHEDULER"], cfg["SCHEDULER"]["params"]
        self.name, self.steps_per_epoch = s["sched_name"], steps_per_epoch
        self.warmup = p["warmup_epochs"]
        self.t_initial = p["t_initial"] or (cfg["TRAIN"]["epochs"] - self.warmup)
        self.t_mult, self.min_factor = p["t_mult"], p["eta_min"] / cfg["OPTIMIZER"]["lr"]
        self.milestones, self.gamma = p["milestones"], p["gamma"]

    def __call__(self, step: int) -> float:
        warmup_steps = self.warmup * self.steps_per_epoch
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        epoch = step / self.steps_per_epoch
        if self.name == "multistep":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        t = epoch - self.warmup
        if self.t_mult == 1:
            t_cur, t_i = t % self.t_initial, self.t_initial
        else:
            i = math.floor(math.log(1 - t / self.t_initial * (1 - self.t_mult), self.t_mult))
            t_cur = t - self.t_initial * (1 - self.t_mult ** i) / (1 - self.t_mult)
            t_i = self.t_initial * self.t_mult ** i
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t_cur / t_i))


def build_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["OPTIMIZER"]
    return torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                           weight_decay=o["weight_decay"], nesterov=o["nesterov"])


def build_scheduler(cfg: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, steps_per_epoch))
