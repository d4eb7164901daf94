"""The training step never makes the host wait for the device, and skips a non-finite step on the device."""

import collections
import contextlib

import pytest
import torch

import tiny_model
from bsdist import config
from bsdist.data import build_data
from bsdist.distributed import init_distributed, shutdown
from bsdist.engine import TrainState, train_one_epoch
from bsdist.losses import BalancedSoftmax
from bsdist.models import build_model
from bsdist.optim import build_optimizer, build_scheduler
from bsdist.output import NullOutput
from bsdist.engine import AMP_DTYPES

tiny_model.register()

# What makes the host wait for a device (or builds a device tensor from host values, one copy each).
HOST_READS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")]
HOST_WRITES = [(torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")]


@contextlib.contextmanager
def counting_host_transfers():
    counts = collections.Counter()
    originals = {}
    for owner, name in HOST_READS + HOST_WRITES:
        original = getattr(owner, name)
        originals[owner, name] = original

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(owner, name, counted)
    try:
        yield counts
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


@pytest.fixture
def env():
    env = init_distributed("cpu", 60)
    yield env
    shutdown()


class PoisonedLoss(BalancedSoftmax):
    """Balanced Softmax whose k-th call returns NaN, decided on the device (no host read)."""

    def __init__(self, num_per_cls, poisoned_call):
        super().__init__(num_per_cls)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.poisoned_call = poisoned_call

    def forward(self, logits, target):
        self.calls += 1
        loss = super().forward(logits, target)
        return loss * torch.where(self.calls == self.poisoned_call, float("nan"), 1.0)


def epoch_of_training(env, batch_size, *overrides, poisoned_call=0):
    """One epoch of the demo data at batch_size; the host transfers it made, the state after it."""
    cfg = config.validate(config.load("configs/demo.yaml", [
        "DATASET.batch_size", str(batch_size), "MODEL.name", "tiny", "TRAIN.device", "cpu", "TRAIN.compile", "false",
        "OPTIMIZER.momentum", "0.9", *overrides]))
    t = cfg.TRAIN
    torch.manual_seed(0)
    data = build_data(cfg, env)
    model = build_model(cfg, data.num_classes, data.in_channels, env.device, False)
    optimizer = build_optimizer(cfg, model.module)
    amp = AMP_DTYPES[t.mixed_precision]
    criterion = PoisonedLoss(list(data.num_per_cls.values()), poisoned_call)
    state = TrainState(model.train, criterion, optimizer, build_scheduler(cfg, optimizer, len(data.train)),
                       torch.amp.GradScaler("cpu", enabled=amp == torch.float16), amp, t.grad_accum_steps, t.nonfinite,
                       check_every=10**6)
    with counting_host_transfers() as counts:
        train_one_epoch(state, data, env, NullOutput(), 0, 1, log_interval=10**6)
    epoch_of_training.data = data  # for a test that recomputes a batch
    return counts, state, model


@pytest.mark.parametrize("overrides", [
    ["TRAIN.mixed_precision", "no"],
    ["TRAIN.mixed_precision", "fp16"],  # GradScaler with the fused optimiser: no found_inf.item()
    ["TRAIN.mixed_precision", "no", "TRAIN.grad_accum_steps", "2"],
    ["TRAIN.mixed_precision", "no", "TRAIN.nonfinite", "skip"],
], ids=["fp32", "fp16", "accumulation", "skip"])
def test_host_transfers_do_not_grow_with_the_steps_between_check_points(env, overrides):
    few, state_few, _ = epoch_of_training(env, 64, *overrides, poisoned_call=3 if "skip" in overrides else 0)
    many, state_many, _ = epoch_of_training(env, 16, *overrides, poisoned_call=3 if "skip" in overrides else 0)
    assert state_many.step >= 3 * state_few.step > 0  # several times the steps ...
    assert many == few, (dict(few), dict(many))  # ... the same transfers: those of the epoch's start and end
    assert sum(few.values()) <= 12


def test_a_step_with_a_non_finite_loss_changes_no_weight_and_later_steps_train(env, monkeypatch):
    import bsdist.engine
    steps, original = [], bsdist.engine.optimizer_step

    def recording_step(optimizer, scaler, skip):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params] + [optimizer.state[p]["momentum_buffer"].clone() for p in params]
        original(optimizer, scaler, skip)
        after = [p.detach().clone() for p in params] + [optimizer.state[p]["momentum_buffer"].clone() for p in params]
        steps.append(all(torch.equal(a, b) for a, b in zip(before, after)))
    monkeypatch.setattr(bsdist.engine, "optimizer_step", recording_step)
    _, state, model = epoch_of_training(env, 64, "TRAIN.nonfinite", "skip", "TRAIN.mixed_precision", "no", poisoned_call=3)
    assert steps == [False, False, True] + [False] * (state.step - 3)  # only the poisoned third step left everything as it was
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_a_short_last_accumulation_group_averages_over_its_own_micro_batches(env, monkeypatch):
    """403 images in micro-batches of 80 are 5 micro-batches: groups of 2, 2 and 1. The last step's gradient
    is that of its one micro-batch's mean loss, not half of it."""
    import copy
    import bsdist.engine
    calls, steps = [], []
    micro_batch, step = bsdist.engine._micro_batch, bsdist.engine.optimizer_step

    def recording_micro_batch(state, data, env, batch, group_size, last_of_group, tally):
        calls.append((copy.deepcopy(state.model), [t.clone() for t in batch], group_size))  # the weights it starts from
        micro_batch(state, data, env, batch, group_size, last_of_group, tally)

    def recording_step(optimizer, scaler, skip):
        steps.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])
        step(optimizer, scaler, skip)
    monkeypatch.setattr(bsdist.engine, "_micro_batch", recording_micro_batch)
    monkeypatch.setattr(bsdist.engine, "optimizer_step", recording_step)
    _, state, _ = epoch_of_training(env, 80, "TRAIN.grad_accum_steps", "2", "TRAIN.mixed_precision", "no")
    assert [c[2] for c in calls] == [2, 2, 2, 2, 1] and state.step == len(steps) == 3
    model, (images, targets, indices), _ = calls[-1]
    data = epoch_of_training.data
    loss = state.criterion(model(data.augment(images, indices)), targets)
    loss.backward()
    for got, want in zip(steps[-1], [p.grad for p in model.parameters()]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_the_other_ranks_output_has_exactly_rank_0_s_methods():
    from bsdist.output import RunOutput
    public = lambda cls: {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}  # noqa: E731
    assert public(NullOutput) == public(RunOutput)
    assert NullOutput().checkpoint_failed() is False and NullOutput().info("a line") is None
    with pytest.raises(AttributeError):
        NullOutput().infoo("a misspelt call fails on every rank")
