import math

import pytest
import torch

from bsdist import config
from bsdist.optim import LRFactor, build_optimizer, build_scheduler


def cfg_with(**overrides):
    tokens = [t for k, v in overrides.items() for t in (k.replace("__", "."), str(v))]
    return config.validate(config.load(None, tokens))


def lrs(cfg, steps_per_epoch):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    out = []
    for _ in range(cfg.TRAIN.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_starts_at_lr_and_ends_near_eta_min():
    cfg = cfg_with(TRAIN__epochs=10, OPTIMIZER__lr=0.1, SCHEDULER__params__eta_min=0.001)
    values = lrs(cfg, 5)
    assert values[0] == pytest.approx(0.1)
    assert values[-1] == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone without restarts
    assert values[25] == pytest.approx(0.001 + 0.099 * 0.5)  # half way


def test_linear_warmup_then_cosine():
    cfg = cfg_with(TRAIN__epochs=10, SCHEDULER__params__warmup_epochs=2, SCHEDULER__params__eta_min=0)
    values = lrs(cfg, 4)
    assert values[:8] == pytest.approx([0.1 * (i + 1) / 8 for i in range(8)])
    assert values[8] == pytest.approx(0.1)
    assert values[8 + 16] == pytest.approx(0.05)


def test_warm_restarts_with_t_mult():
    cfg = cfg_with(TRAIN__epochs=7, SCHEDULER__params__t_initial=1, SCHEDULER__params__t_mult=2,
                   SCHEDULER__params__eta_min=0)
    values = lrs(cfg, 4)
    restarts = [i for i in range(1, len(values)) if values[i] > values[i - 1]]
    assert restarts == [4, 12]  # cycles of 1, 2, 4 epochs
    assert values[12] == pytest.approx(0.1)


def test_warm_restart_cycles_grow_by_t_mult():
    # cycles of 2, 6 and 18 epochs from epochs 0, 2 and 8, at half epochs (t_mult 2 and t_initial 1 would not tell
    # t / t_initial * (1 - t_mult) from t * t_initial / (1 - t_mult))
    cfg = cfg_with(TRAIN__epochs=26, SCHEDULER__params__t_initial=2, SCHEDULER__params__t_mult=3,
                   SCHEDULER__params__eta_min=0)
    factor = LRFactor(cfg, 2)
    expected = [0.5 * (1 + math.cos(math.pi * k / 2 / length)) for length in (2, 6, 18) for k in range(2 * length)]
    assert [factor(step) for step in range(52)] == pytest.approx(expected)


@pytest.mark.parametrize("t_mult, restart", [(3, 121), (10, 111), (2, 63)])
def test_a_restart_starts_at_the_peak_even_where_the_float_log_falls_short(t_mult, restart):
    # cycles of 1, t_mult, t_mult^2, ... epochs: math.log(243, 3) is 4.999..., which once put epoch 121 in the
    # previous cycle's last step (eta_min) instead of the new cycle's first (the peak)
    cfg = cfg_with(TRAIN__epochs=restart + 1, SCHEDULER__params__t_initial=1, SCHEDULER__params__t_mult=t_mult,
                   SCHEDULER__params__eta_min=0)
    factor = LRFactor(cfg, 1)
    assert factor(restart) == 1.0 and factor(restart - 1) < 0.01


def test_multistep_decays_at_milestones():
    cfg = cfg_with(TRAIN__epochs=6, SCHEDULER__sched_name="multistep", SCHEDULER__params__milestones="[2, 4]",
                   SCHEDULER__params__gamma=0.5)
    values = lrs(cfg, 3)
    assert values == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 6)


def test_the_schedule_is_a_function_of_the_fractional_epoch():
    # a rate depends on global step / steps per epoch only: twice the steps per epoch (half the global
    # batch) follows the same curve, and warmup ends exactly at warmup_epochs
    cfg = cfg_with(TRAIN__epochs=5, SCHEDULER__params__warmup_epochs=1)
    coarse, fine = LRFactor(cfg, 7), LRFactor(cfg, 14)
    assert coarse(6) == fine(13) == 1.0 and coarse(5) < 1.0
    for step in range(7, 35):
        assert coarse(step) == pytest.approx(fine(2 * step)), step
    assert fine(15) != pytest.approx(coarse(7))  # between coarse steps the curve moves on


def test_optimizer_follows_config():
    cfg = cfg_with(OPTIMIZER__lr=0.2, OPTIMIZER__momentum=0.9, OPTIMIZER__weight_decay=5e-4, OPTIMIZER__nesterov="true")
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2))
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.2, 0.9, 5e-4, True)


def test_a_first_step_skipped_on_the_device_leaves_momentum_at_zero():
    """torch's fused SGD allocates momentum uninitialised on its first step and keeps that memory when the
    step is skipped through found_inf; bsdist starts momentum at zero, which is SGD's first step exactly."""
    from bsdist.optim import optimizer_step
    cfg = cfg_with(OPTIMIZER__momentum=0.9, OPTIMIZER__weight_decay=0.01)
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    opt = build_optimizer(cfg, model)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    optimizer_step(opt, scaler, torch.ones(1))  # skipped
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, q, g in zip(model.parameters(), reference.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer_step(opt, scaler, torch.zeros(1))
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
