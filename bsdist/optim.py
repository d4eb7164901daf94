"""SGD, a learning-rate schedule stepped once per optimiser step, and the step itself (skipped on the device).

Every rank steps the same number of times per epoch (the global step count), so the schedule is
the one a single process would follow, whatever the world size. Schedules are functions of the
fractional epoch: linear warmup, then cosine annealing with warm restarts or multistep decay.
"""

from __future__ import annotations

import math

import torch

from bsdist.config import Config


class LRFactor:
    """Multiplier of the peak learning rate at a given optimiser step (picklable, so resumable)."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        params = cfg.SCHEDULER.params
        self.name, self.steps_per_epoch = cfg.SCHEDULER.sched_name, steps_per_epoch
        self.warmup = params.warmup_epochs
        self.t_initial = params.t_initial or (cfg.TRAIN.epochs - self.warmup)
        self.t_mult, self.min_factor = params.t_mult, params.eta_min / cfg.OPTIMIZER.lr
        self.milestones, self.gamma = params.milestones, params.gamma

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
            def start(i: int) -> float:  # the epoch at which cycle i begins
                return self.t_initial * (self.t_mult ** i - 1) / (self.t_mult - 1)
            i = math.floor(math.log(1 - t / self.t_initial * (1 - self.t_mult), self.t_mult))
            i += (start(i + 1) <= t) - (start(i) > t)  # the float log lands either side of a restart (log(243, 3))
            t_cur, t_i = t - start(i), self.t_initial * self.t_mult ** i
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t_cur / t_i))


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused SGD (one kernel for all parameters, CPU and CUDA), which can skip a step on the device.

    Momentum buffers start as zeros, which is SGD's first step exactly (buffer = gradient): torch's
    fused SGD otherwise allocates them uninitialised on the first step and, when that step is skipped
    through `found_inf`, keeps the uninitialised memory as momentum.
    """
    settings = cfg.OPTIMIZER
    trained = [p for p in model.parameters() if p.requires_grad]  # a frozen backbone (CRT.stage1) is left out
    optimizer = torch.optim.SGD(trained, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=settings.nesterov, fused=True)
    if settings.momentum:
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor) -> None:
    """One optimiser step, decided on the device: nothing changes where `skip` (a float 0/1 tensor, the
    same on every rank) is 1. The host never waits.

    With fp16 the gradient scaler decides instead, from the gradients: it skips a step whose gradients
    are not finite (and lowers its scale), and a non-finite fp16 loss (non-finite logits) always gives
    such gradients, on every rank once DDP has all-reduced them.
    """
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class RunningStats:
    """A model's BatchNorm running statistics as they stood before an optimiser step, put back on the device
    when the step is skipped (TRAIN.nonfinite skip).

    The step's forward passes have already folded its batches into them, and a non-finite batch leaves a
    NaN that every later batch keeps (inf - inf), so a skip that kept the weights but not these would make
    every later evaluation NaN. Per step: one multi-tensor copy and one `where` per buffer; no host read.
    """

    def __init__(self, model: torch.nn.Module):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                 and m.running_mean is not None]
        self.buffers = [b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore_if(self, skip: torch.Tensor) -> None:
        """Where `skip` (float 0/1, one element) is 1, the statistics saved last; otherwise as they are."""
        keep_saved = skip.reshape(()).bool()
        for buffer, saved in zip(self.buffers, self.saved):
            torch.where(keep_saved, saved, buffer, out=buffer)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, steps_per_epoch))
