"""The Trainer's loop: the training step never makes the host wait for the device, skips a non-finite step on
the device, and the ranks agree at sync points."""

import collections
import contextlib
import math
import types

import pytest
import torch

import tiny_model
from bsdist import config
from bsdist.distributed import init_distributed, shutdown
from bsdist.errors import BsdistError
from bsdist.losses import BalancedSoftmax
from bsdist.output import NullOutput
from bsdist.rundir import Start
from bsdist.tally import DeviceTally, EpochProgress
from bsdist.trainer import Trainer

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

    def __init__(self, settings, context, poisoned_call):
        super().__init__(settings, context)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.poisoned_call = poisoned_call

    def forward(self, logits, target):
        self.calls += 1
        loss = super().forward(logits, target)
        return loss * torch.where(self.calls == self.poisoned_call, float("nan"), 1.0)


def epoch_of_training(env, batch_size, *overrides, poisoned_call=0, out=None, epoch=0, epochs=15, log_interval=10**6,
                      progress=None, check_every=10**6, checkpoint_every=0, step=0, signal=0, save=None,
                      last_checkpoint="", hook=None):
    """One epoch of the demo data at batch_size through the Trainer; the host transfers it made, the trainer
    after it. `step` is the global step it starts from, `signal` the one received, `save` replaces checkpoints."""
    cfg = config.validate(config.load("configs/demo.yaml", [
        "DATASET.batch_size", str(batch_size), "MODEL.name", "tiny", "TRAIN.device", "cpu", "TRAIN.compile", "false",
        "OPTIMIZER.momentum", "0.9", "TRAIN.epochs", str(epochs), "TRAIN.log_interval", str(log_interval),
        "TRAIN.check_every_steps", str(check_every), "TRAIN.ckpt_every_steps", str(checkpoint_every), *overrides]))
    trainer = Trainer(cfg, env, out or NullOutput(), Start(), types.SimpleNamespace(received=signal))
    if poisoned_call is not None:  # None trains with the configured loss itself
        trainer.loss = PoisonedLoss(cfg.LOSS, trainer.method, poisoned_call)
    trainer.method.step, trainer.last_checkpoint = step, last_checkpoint
    trainer.progress = progress or EpochProgress()
    if save is not None:
        trainer.save = save
    if hook is not None:
        trainer.method.on_step(hook)
    with counting_host_transfers() as counts:
        trainer.train_epoch(epoch)
    return counts, trainer


@pytest.mark.parametrize("overrides", [
    ["TRAIN.mixed_precision", "no"],
    ["TRAIN.mixed_precision", "fp16"],  # GradScaler with the fused optimiser: no found_inf.item()
    ["TRAIN.mixed_precision", "no", "TRAIN.grad_accum_steps", "2"],
    ["TRAIN.mixed_precision", "no", "TRAIN.nonfinite", "skip"],
], ids=["fp32", "fp16", "accumulation", "skip"])
def test_host_transfers_do_not_grow_with_the_steps_between_sync_points(env, overrides):
    few, trainer_few = epoch_of_training(env, 64, *overrides, poisoned_call=3 if "skip" in overrides else 0)
    many, trainer_many = epoch_of_training(env, 16, *overrides, poisoned_call=3 if "skip" in overrides else 0)
    assert trainer_many.method.step >= 3 * trainer_few.method.step > 0  # several times the steps ...
    assert many == few, (dict(few), dict(many))  # ... the same transfers: those of the epoch's start and end
    assert sum(few.values()) <= 12


@pytest.mark.parametrize("overrides", [
    ["LOSS.name", "LDAMLoss", "LOSS.drw_epoch", "0", "MODEL.name", "tiny_fc", "MODEL.classifier", "cosine"],
    ["LOSS.name", "ClassBalancedLoss", "LOSS.cb_loss_type", "softmax"],
    ["LOSS.name", "ClassBalancedLoss", "LOSS.cb_loss_type", "sigmoid"],
    ["LOSS.name", "ClassBalancedLoss", "LOSS.cb_loss_type", "focal"],
    ["LOSS.name", "FocalLoss"],
], ids=["LDAMLoss-DRW", "ClassBalancedLoss-softmax", "ClassBalancedLoss-sigmoid", "ClassBalancedLoss-focal",
        "FocalLoss"])
def test_the_long_tail_losses_add_no_host_transfer_to_the_step(env, overrides):
    """The losses of issue 24 train with what they built at start (margins, class weights on the device):
    their steps make the host wait no more than Balanced Softmax's (DRW's re-weighting in force included)."""
    few, trainer_few = epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", *overrides, poisoned_call=None)
    many, trainer_many = epoch_of_training(env, 16, "TRAIN.mixed_precision", "no", *overrides, poisoned_call=None)
    assert type(trainer_many.loss).__name__ == overrides[1]
    assert trainer_many.method.step >= 3 * trainer_few.method.step > 0
    assert many == few, (dict(few), dict(many))
    assert sum(few.values()) <= 12


def test_a_step_with_a_non_finite_loss_changes_no_weight_and_later_steps_train(env, monkeypatch):
    import bsdist.trainer
    steps, original = [], bsdist.trainer.optimizer_step

    def recording_step(optimizer, scaler, skip):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params] + [optimizer.state[p]["momentum_buffer"].clone() for p in params]
        original(optimizer, scaler, skip)
        after = [p.detach().clone() for p in params] + [optimizer.state[p]["momentum_buffer"].clone() for p in params]
        steps.append(all(torch.equal(a, b) for a, b in zip(before, after)))
    monkeypatch.setattr(bsdist.trainer, "optimizer_step", recording_step)
    _, trainer = epoch_of_training(env, 64, "TRAIN.nonfinite", "skip", "TRAIN.mixed_precision", "no", poisoned_call=3)
    # only the poisoned third step left everything as it was
    assert steps == [False, False, True] + [False] * (trainer.method.step - 3)
    assert all(torch.isfinite(p).all() for p in trainer.model.module.parameters())


def test_a_skipped_step_puts_back_the_batchnorm_statistics_its_forward_pass_changed(env, monkeypatch):
    """A non-finite forward pass (fp16 activations overflowing) folds inf into BatchNorm's running statistics
    before the step is skipped; left there they would make every later evaluation NaN."""
    import bsdist.trainer
    from bsdist.data.augment import BatchAugment
    augment, forward_backward, step = BatchAugment.__call__, Trainer.forward_backward, bsdist.trainer.optimizer_step
    calls, before, at_step, trainers = [0], [], [], []

    def statistics(trainer):
        return [b.clone() for name, b in trainer.model.wrapped.named_buffers() if "running" in name]

    def poisoned(self, images, indices):
        calls[0] += 1
        inputs = augment(self, images, indices)
        return inputs * math.inf if calls[0] == 3 else inputs  # the third step's forward pass is not finite

    def recording_forward_backward(self, *args, **kwargs):
        before.append(statistics(self))
        trainers[:] = [self]
        forward_backward(self, *args, **kwargs)

    def recording_step(optimizer, scaler, skip):
        at_step.append(statistics(trainers[0]))
        step(optimizer, scaler, skip)
    monkeypatch.setattr(BatchAugment, "__call__", poisoned)
    monkeypatch.setattr(Trainer, "forward_backward", recording_forward_backward)
    monkeypatch.setattr(bsdist.trainer, "optimizer_step", recording_step)
    _, trainer = epoch_of_training(env, 64, "TRAIN.nonfinite", "skip", "TRAIN.mixed_precision", "no",
                                   "MODEL.name", "tiny_bn")
    unchanged = [all(torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(before, at_step)]
    assert unchanged == [False, False, True] + [False] * (trainer.method.step - 3)  # only the skipped step's put back
    assert all(torch.isfinite(b).all() for b in trainer.model.module.buffers())


def test_a_short_last_accumulation_group_averages_over_its_own_micro_batches(env, monkeypatch):
    """403 images in micro-batches of 80 are 5 micro-batches: groups of 2, 2 and 1. The last step's gradient
    is that of its one micro-batch's mean loss, not half of it."""
    import copy
    import bsdist.trainer
    calls, steps = [], []
    forward_backward, step = Trainer.forward_backward, bsdist.trainer.optimizer_step

    def recording_forward_backward(self, batch, group_size, last_of_group):
        calls.append((copy.deepcopy(self.model.wrapped), [t.clone() for t in batch], group_size))  # starting weights
        forward_backward(self, batch, group_size, last_of_group)

    def recording_step(optimizer, scaler, skip):
        steps.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])
        step(optimizer, scaler, skip)
    monkeypatch.setattr(Trainer, "forward_backward", recording_forward_backward)
    monkeypatch.setattr(bsdist.trainer, "optimizer_step", recording_step)
    _, trainer = epoch_of_training(env, 80, "TRAIN.grad_accum_steps", "2", "TRAIN.mixed_precision", "no")
    assert [c[2] for c in calls] == [2, 2, 2, 2, 1] and trainer.method.step == len(steps) == 3
    model, (images, targets, indices), _ = calls[-1]
    data = trainer.data
    loss = trainer.loss(model(data.augment(images, indices)), targets)
    loss.backward()
    for got, want in zip(steps[-1], [p.grad for p in model.parameters()]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    # a full group's gradient is that of the mean of its two micro-batches' losses
    model = calls[0][0]
    loss = sum(trainer.loss(model(data.augment(images, indices)), targets)
               for _, (images, targets, indices), _ in calls[:2]) / 2
    loss.backward()
    for got, want in zip(steps[0], [p.grad for p in model.parameters()]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_method_s_step_hook_runs_after_every_optimiser_step_and_reads_the_epoch_and_step(env):
    """The seam a method with a step of its own (a meta-learned sampler) plugs into: the context's epoch and
    step are host ints, current when the hook runs."""
    seen = []
    _, trainer = epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", epoch=1, epochs=3, step=6,
                                   hook=lambda context: seen.append((context.epoch, context.step)))
    assert seen == [(1, s) for s in range(7, 13)] and trainer.method.step == 12


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


def test_sync_points_come_at_log_points_checkpoints_every_check_every_steps_and_the_epoch_end(env, monkeypatch):
    points, saves, sync_point = [], [], Trainer.sync_point

    def recording_sync_point(self):
        points.append(self.method.step)
        return sync_point(self)
    monkeypatch.setattr(Trainer, "sync_point", recording_sync_point)
    out = RecordingOutput()
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", out=out, epoch=1, epochs=3, log_interval=4, step=6,
                      checkpoint_every=3, check_every=5, save=lambda epoch, progress: saves.append((epoch, progress)))
    # 403 images in batches of 64 are 6 steps (global 7 to 12): a checkpoint at 3, logs at 4 and 6, a check at 5;
    # none checkpoints at the end, which the epoch's own checkpoint covers
    assert points == [9, 10, 11, 12]
    assert [(epoch, p.step, p.images) for epoch, p in saves] == [(1, 3, 192.0)]
    assert 0 < saves[0][1].correct <= 192 and saves[0][1].loss_sum > 0
    # a checkpoint logs too
    assert [line.split(" loss ")[0] for line in out.lines] == [f"epoch 2/3 step {s}/6" for s in (3, 4, 6)]
    assert [(step, sorted(values)) for step, values in out.scalar_logs] == [(s, TRAIN_SCALARS) for s in (9, 10, 12)]


def test_the_log_line_takes_rate_and_eta_from_the_clock_when_resuming_inside_an_epoch(env, monkeypatch):
    import bsdist.trainer
    ticks = iter(range(100, 1000, 10))  # a clock that advances 10 s at every reading
    monkeypatch.setattr(bsdist.trainer, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    micro_batches, forward_backward = [], Trainer.forward_backward

    def recording_forward_backward(self, batch, *args, **kwargs):
        micro_batches.append(batch[2].tolist())  # the images' dataset indices
        forward_backward(self, batch, *args, **kwargs)
    monkeypatch.setattr(Trainer, "forward_backward", recording_forward_backward)
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


def test_a_stop_signal_checkpoints_and_stops_at_the_next_sync_point(env):
    from bsdist.errors import Stopped
    saves = []
    with pytest.raises(Stopped, match=r"^stopped by signal 15 at epoch 2 step 2; last\.pt holds this point: "
                                      r"continue with TRAIN\.resume auto$") as e:
        epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", epoch=1, epochs=3, check_every=2,
                          signal=15, save=lambda epoch, progress: saves.append((epoch, progress.step)))
    assert e.value.signum == 15
    assert saves == [(1, 2)]


def test_a_stop_signal_seen_at_the_epoch_end_is_left_to_the_caller(env):
    saves = []
    epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", signal=15,
                      save=lambda epoch, progress: saves.append(progress.step))
    assert saves == []


@pytest.mark.parametrize("last_checkpoint, kept", [
    ("", "no checkpoint was written, so the next attempt starts afresh:"),
    ("epoch 2 step 2", r"last\.pt \(epoch 2 step 2\) is the last good point: continue from it with "
                       r"TRAIN\.nonfinite skip and TRAIN\.resume auto, or"),
], ids=["no-checkpoint", "after-a-checkpoint"])
def test_a_non_finite_loss_stops_at_the_next_sync_point_naming_its_step(env, last_checkpoint, kept):
    message = rf"^non-finite loss at epoch 2 step 3 \(global step 9\), a step that changed no weight; {kept} retry "
    with pytest.raises(BsdistError, match=message + r"with a lower OPTIMIZER\.lr or TRAIN\.mixed_precision no \("):
        epoch_of_training(env, 64, "TRAIN.mixed_precision", "no", "TRAIN.nonfinite", "stop", poisoned_call=3, epoch=1,
                          epochs=3, step=6, last_checkpoint=last_checkpoint)


def test_skipped_non_finite_steps_are_reported_at_the_next_sync_point(env):
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
    assert tally.flags.tolist() == [2.0, 4.0]  # two skipped steps, the first at global step 4
    tally.clear_flags()
    assert tally.flags.tolist() == [0.0, math.inf]  # counted afresh after each sync point
    # loss sums 1 + 2 + 1 + 3, images 2 + 1 + 1 + 3, correct 1 + 1 + 1 + 2; the norms of steps 3 and 7
    assert tally.read_loss() == pytest.approx((1.0, 5 / 7, 7.0, 2.0))
    loss, accuracy, images, norm = tally.read_loss()  # nothing since the last read
    assert (loss, accuracy, images) == (0.0, 0.0, 0.0) and math.isnan(norm)
    assert tally.epoch_means() == pytest.approx((13 / 11, 6 / 11))  # with the resumed epoch's sums


def test_the_device_tally_keeps_its_sums_in_float64(env):
    """A float32 loss times a micro-batch's size need not be a float32 number: the sums keep it exactly."""
    tally, loss = DeviceTally(env.device, EpochProgress()), torch.tensor(0.1)
    for step, right in enumerate([[True], [True, False, False], [False]], start=1):
        logits = torch.tensor([[1.0, 0.0] if r else [0.0, 1.0] for r in right])
        tally.add(loss, logits, torch.zeros(len(right), dtype=torch.long))
        tally.end_step(step, torch.tensor(1.0))
        assert tally.read_loss() == (loss.item(), sum(right) / len(right), len(right), 1.0)
        if step == 1:  # one image
            assert tally.epoch_means() == (loss.item(), 1.0)
    assert tally.epoch_means() == (loss.item(), 2 / 5)  # 5 * loss is no float32 number either


def test_every_rank_stops_at_a_sync_point_when_rank_0_could_not_write_a_checkpoint(env):
    class FailedWrite(NullOutput):
        waited = False

        def checkpoint_failed(self):
            return True

        def wait_for_checkpoints(self, raise_error=True):  # rank 0 raises its write's error here
            self.waited = True
    out = FailedWrite()
    at_sync_point = types.SimpleNamespace(env=env, out=out, signals=types.SimpleNamespace(received=0),
                                          tally=DeviceTally(env.device, EpochProgress()))
    with pytest.raises(BsdistError, match="rank 0 could not write a checkpoint"):
        Trainer.sync_point(at_sync_point)
    assert out.waited


def test_steps_and_durations_in_messages():
    from bsdist.runlog import describe_step, duration
    assert [describe_step(s, 6) for s in (6, 7, 9)] == [
        "epoch 1 step 6 (global step 6)", "epoch 2 step 1 (global step 7)", "epoch 2 step 3 (global step 9)"]
    assert [duration(s) for s in (0.9, 59, 3600, 3600 * 27 + 61.5)] == ["0:00:00", "0:00:59", "1:00:00", "27:01:01"]
