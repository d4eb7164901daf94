"""The training step never makes the host wait for the device, and skips a non-finite step on the device."""

import collections
import contextlib
import math

import pytest
import torch

import tiny_model
from bsdist import config
from bsdist.data import build_data
from bsdist.distributed import init_distributed, shutdown
from bsdist.errors import BsdistError
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


def epoch_of_training(env, batch_size, *overrides, poisoned_call=0, out=None, epoch=0, epochs=1, log_interval=10**6,
                      progress=None, **fields):
    """One epoch of the demo data at batch_size; the host transfers it made, the state after it. `fields` set
    TrainState's (check_every, save, ...)."""
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
    state = TrainState(model.wrapped, criterion, optimizer, build_scheduler(cfg, optimizer, len(data.train)),
                       torch.amp.GradScaler("cpu", enabled=amp == torch.float16), amp, t.grad_accum_steps, t.nonfinite,
                       **{"check_every": 10**6, **fields})
    with counting_host_transfers() as counts:
        train_one_epoch(state, data, env, out or NullOutput(), epoch, epochs, log_interval=log_interval,
                        progress=progress)
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
    _, state, model = epoch_of_training(env, 64, "TRAIN.nonfinite", "skip", "TRAIN.mixed_precision", "no",
                                        poisoned_call=3)
    # only the poisoned third step left everything as it was
    assert steps == [False, False, True] + [False] * (state.step - 3)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_a_skipped_step_puts_back_the_batchnorm_statistics_its_forward_pass_changed(env, monkeypatch):
    """A non-finite forward pass (fp16 activations overflowing) folds inf into BatchNorm's running statistics
    before the step is skipped; left there they would make every later evaluation NaN."""
    import bsdist.engine
    from bsdist.data.augment import BatchAugment
    augment, micro_batch, step = BatchAugment.__call__, bsdist.engine._micro_batch, bsdist.engine.optimizer_step
    calls, before, at_step = [0], [], []

    def statistics(state):
        return [b.clone() for name, b in state.model.named_buffers() if "running" in name]

    def poisoned(self, images, indices):
        calls[0] += 1
        inputs = augment(self, images, indices)
        return inputs * math.inf if calls[0] == 3 else inputs  # the third step's forward pass is not finite

    def recording_micro_batch(state, *args):
        before.append(statistics(state))
        recording_micro_batch.state = state
        micro_batch(state, *args)

    def recording_step(optimizer, scaler, skip):
        at_step.append(statistics(recording_micro_batch.state))
        step(optimizer, scaler, skip)
    monkeypatch.setattr(BatchAugment, "__call__", poisoned)
    monkeypatch.setattr(bsdist.engine, "_micro_batch", recording_micro_batch)
    monkeypatch.setattr(bsdist.engine, "optimizer_step", recording_step)
    _, state, model = epoch_of_training(env, 64, "TRAIN.nonfinite", "skip", "TRAIN.mixed_precision", "no",
                                        "MODEL.name", "tiny_bn")
    unchanged = [all(torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(before, at_step)]
    assert unchanged == [False, False, True] + [False] * (state.step - 3)  # only the skipped step's were put back
    assert all(torch.isfinite(b).all() for b in model.module.buffers())


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
    # a full group's gradient is that of the mean of its two micro-batches' losses
    model = calls[0][0]
    loss = sum(state.criterion(model(data.augment(images, indices)), targets)
               for _, (images, targets, indices), _ in calls[:2]) / 2
    loss.backward()
    for got, want in zip(steps[0], [p.grad for p in model.parameters()]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_the_other_ranks_output_has_exactly_rank_0_s_methods():
    from bsdist.output import RunOutput
    public = lambda cls: {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}  # noqa: E731
    assert public(NullOutput) == public(RunOutput)
    assert NullOutput().checkpoint_failed() is False and NullOutput().info("a line") is None
    with pytest.raises(AttributeError):
        NullOutput().infoo("a misspelt call fails on every rank")


class RecordingOutput(NullOutput):
    """Rank 0's output as the epoch loop uses it: the lines and scalars it was given."""

    def __init__(self):
        self.lines, self.scalar_logs = [], []

    def info(self, message, console=True):
        self.lines.append(message)

    def scalars(self, values, step):
        self.scalar_logs.append((step, values))


TRAIN_SCALARS = ["train/acc", "train/grad_norm", "train/img_per_s", "train/loss", "train/lr"]


def test_check_points_come_at_log_points_checkpoints_every_check_every_steps_and_the_epoch_end(env, monkeypatch):
    import bsdist.engine
    points, saves, check_point = [], [], bsdist.engine._check_point

    def recording_check_point(state, tally, out, here, step_in_epoch, lr, log_due, checkpoint_due):
        points.append((step_in_epoch, log_due, checkpoint_due))
        check_point(state, tally, out, here, step_in_epoch, lr, log_due, checkpoint_due)
    monkeypatch.setattr(bsdist.engine, "_check_point", recording_check_point)
    out = RecordingOutput()
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", out=out, epoch=1, epochs=3, log_interval=4, step=6,
                      checkpoint_every=3, check_every=5, save=lambda epoch, progress: saves.append((epoch, progress)))
    # 403 images in batches of 64 are 6 steps; none checkpoints at the end, which the epoch's own checkpoint covers
    assert points == [(3, False, True), (4, True, False), (5, False, False), (6, True, False)]
    assert [(epoch, p.step, p.images) for epoch, p in saves] == [(1, 3, 192.0)]
    assert 0 < saves[0][1].correct <= 192 and saves[0][1].loss_sum > 0
    # a checkpoint logs too
    assert [line.split(" loss ")[0] for line in out.lines] == [f"epoch 2/3 step {s}/6" for s in (3, 4, 6)]
    assert [(step, sorted(values)) for step, values in out.scalar_logs] == [(s, TRAIN_SCALARS) for s in (9, 10, 12)]


def test_the_log_line_takes_rate_and_eta_from_the_clock_when_resuming_inside_an_epoch(env, monkeypatch):
    import types

    import bsdist.engine
    from bsdist.engine import EpochProgress
    ticks = iter(range(100, 1000, 10))  # a clock that advances 10 s at every reading
    monkeypatch.setattr(bsdist.engine, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    micro_batches, micro_batch = [], bsdist.engine._micro_batch

    def recording_micro_batch(state, data, env, batch, *args):
        micro_batches.append(batch[2].tolist())  # the images' dataset indices
        micro_batch(state, data, env, batch, *args)
    monkeypatch.setattr(bsdist.engine, "_micro_batch", recording_micro_batch)
    out = RecordingOutput()
    progress = EpochProgress(step=3, loss_sum=384.0, images=192.0, correct=96.0)
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", out=out, epoch=1, epochs=3, log_interval=1,
                      progress=progress, step=9)
    # steps 4, 5 and 6 of 6 (64 images each), 10 s apart, with 8, 7 and 6 steps of the run left after them
    assert [line.split(" loss ")[0] for line in out.lines] == [f"epoch 2/3 step {s}/6" for s in (4, 5, 6)]
    assert [line.split(" lr ")[1].split(" ", 1)[1] for line in out.lines] == [
        "6 img/s eta 0:01:20", "6 img/s eta 0:01:10", "6 img/s eta 0:01:00"]
    assert [step for step, _ in out.scalar_logs] == [10, 11, 12]
    assert [values["train/img_per_s"] for _, values in out.scalar_logs] == pytest.approx([6.4, 6.4, 6.4])
    # only the batches after the checkpoint's: those of the same epoch run whole, from the fourth on
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", epoch=1, epochs=3)
    assert micro_batches[:3] == micro_batches[3 + 3:]


def test_a_stop_signal_checkpoints_and_stops_at_the_next_check_point(env):
    from bsdist.errors import Stopped
    saves = []
    with pytest.raises(Stopped, match=r"^stopped by signal 15 at epoch 2 step 2; last\.pt holds this point: "
                                      r"continue with TRAIN\.resume auto$") as e:
        epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", epoch=1, epochs=3, check_every=2,
                          stop_requested=lambda: 15, save=lambda epoch, progress: saves.append((epoch, progress.step)))
    assert e.value.signum == 15
    assert saves == [(1, 2)]


def test_a_stop_signal_seen_at_the_epoch_end_is_left_to_the_caller(env):
    saves = []
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", stop_requested=lambda: 15,
                      save=lambda epoch, progress: saves.append(progress.step))
    assert saves == []


@pytest.mark.parametrize("last_checkpoint, kept", [
    ("", "no checkpoint was written, so the next attempt starts afresh:"),
    ("epoch 2 step 2", r"last\.pt \(epoch 2 step 2\) is the last good point: continue from it with "
                       r"TRAIN\.nonfinite skip and TRAIN\.resume auto, or"),
], ids=["no-checkpoint", "after-a-checkpoint"])
def test_a_non_finite_loss_stops_at_the_next_check_point_naming_its_step(env, last_checkpoint, kept):
    message = rf"^non-finite loss at epoch 2 step 3 \(global step 9\), a step that changed no weight; {kept} retry "
    with pytest.raises(BsdistError, match=message + r"with a lower OPTIMIZER\.lr or TRAIN\.mixed_precision no \("):
        epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", "TRAIN.nonfinite", "stop", poisoned_call=3, epoch=1,
                          epochs=3, step=6, last_checkpoint=last_checkpoint)


def test_skipped_non_finite_steps_are_reported_at_the_next_check_point(env):
    out = RecordingOutput()
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", "TRAIN.nonfinite", "skip", poisoned_call=3, out=out,
                      epoch=1, epochs=3, step=6)
    assert out.lines[0] == ("1 step(s) with a non-finite loss on some rank skipped, the first at epoch 2 step 3 "
                            "(global step 9) (TRAIN.nonfinite skip)")


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("no", torch.float32)],
                         ids=["fp16", "bf16", "no"])
def test_the_forward_pass_runs_in_the_configured_precision(env, monkeypatch, precision, dtype):
    dtypes, forward = set(), BalancedSoftmax.forward

    def recording_forward(self, logits, target, reduction="mean"):
        dtypes.add(logits.dtype)
        return forward(self, logits, target, reduction)
    monkeypatch.setattr(BalancedSoftmax, "forward", recording_forward)
    epoch_of_training(env, 64, "TRAIN.mixed_precision", precision)
    assert dtypes == {dtype}


def test_the_device_tally_sums_finite_steps_and_counts_the_skipped_ones(env):
    from bsdist.engine import DeviceTally, EpochProgress
    tally = DeviceTally(env.device, EpochProgress(step=2, loss_sum=6.0, images=4.0, correct=1.0))
    logits, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])  # right, wrong, right
    nan = torch.tensor(float("nan"))
    steps = [  # (global step, its micro-batches as (mean loss, images), gradient norm)
        (3, [(torch.tensor(0.5), slice(0, 2)), (torch.tensor(2.0), slice(2, 3))], torch.tensor(3.0)),
        (4, [(nan, slice(0, 1))], torch.tensor(5.0)),  # skipped
        (5, [(torch.tensor(1.0), slice(0, 1))], torch.tensor(float("inf"))),  # fp16's scaler skips it: norm left out
        (6, [(nan, slice(0, 1))], torch.tensor(7.0)),  # skipped
        (7, [(torch.tensor(1.0), slice(0, 3))], torch.tensor(1.0)),
    ]
    skips = []
    for step, micro_batches, norm in steps:
        for loss, part in micro_batches:
            tally.add(loss, logits[part], targets[part])
        skips.append(tally.end_step(step, norm).tolist())
    assert skips == [[0.0], [1.0], [0.0], [1.0], [0.0]]
    assert tally.agree(0, NullOutput()) == (2, 4, 0)  # two skipped steps, the first at global step 4
    assert tally.agree(15, NullOutput()) == (0, 0, 15)  # counted afresh after each check point
    # loss sums 1 + 2 + 1 + 3, images 2 + 1 + 1 + 3, correct 1 + 1 + 1 + 2; the norms of steps 3 and 7
    assert tally.read_loss() == pytest.approx((1.0, 5 / 7, 7.0, 2.0))
    loss, accuracy, images, norm = tally.read_loss()  # nothing since the last read
    assert (loss, accuracy, images) == (0.0, 0.0, 0.0) and math.isnan(norm)
    assert tally.epoch_means() == pytest.approx((13 / 11, 6 / 11))  # with the resumed epoch's sums


def test_the_device_tally_keeps_its_sums_in_float64(env):
    """A float32 loss times a micro-batch's size need not be a float32 number: the sums keep it exactly."""
    from bsdist.engine import DeviceTally, EpochProgress
    tally, loss = DeviceTally(env.device, EpochProgress()), torch.tensor(0.1)
    for step, right in enumerate([[True], [True, False, False], [False]], start=1):
        logits = torch.tensor([[1.0, 0.0] if r else [0.0, 1.0] for r in right])
        tally.add(loss, logits, torch.zeros(len(right), dtype=torch.long))
        tally.end_step(step, torch.tensor(1.0))
        assert tally.read_loss() == (loss.item(), sum(right) / len(right), len(right), 1.0)
        if step == 1:  # one image
            assert tally.epoch_means() == (loss.item(), 1.0)
    assert tally.epoch_means() == (loss.item(), 2 / 5)  # 5 * loss is no float32 number either


def test_every_rank_stops_at_a_check_point_when_rank_0_could_not_write_a_checkpoint(env):
    from bsdist.engine import DeviceTally, EpochProgress

    class FailedWrite(NullOutput):
        waited = False

        def checkpoint_failed(self):
            return True

        def wait_for_checkpoints(self, raise_error=True):  # rank 0 raises its write's error here
            self.waited = True
    out = FailedWrite()
    with pytest.raises(BsdistError, match="rank 0 could not write a checkpoint"):
        DeviceTally(env.device, EpochProgress()).agree(0, out)
    assert out.waited


def test_steps_and_durations_in_messages():
    from bsdist.engine import _describe_step, _duration
    assert [_describe_step(s, 6) for s in (6, 7, 9)] == [
        "epoch 1 step 6 (global step 6)", "epoch 2 step 1 (global step 7)", "epoch 2 step 3 (global step 9)"]
    assert [_duration(s) for s in (0.9, 59, 3600, 3600 * 27 + 61.5)] == ["0:00:00", "0:00:59", "1:00:00", "27:01:01"]
