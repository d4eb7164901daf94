import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bsdist.errors import BsdistError
from bsdist.config import Config
from bsdist.losses import LOSSES, BalancedSoftmax, CrossEntropyLoss, build_loss
from bsdist.method import MethodContext, broadcast_class_prior
from spawn import run_ranks


def built(name, counts, **settings):
    """The loss LOSS.name `name` builds for a run whose training set has `counts` per class."""
    loss_settings = dataclasses.replace(Config().LOSS, name=name, **settings)
    return build_loss(loss_settings, MethodContext.of(counts, head=lambda: None))


def test_balanced_softmax_is_cross_entropy_on_logits_plus_log_counts():
    counts = [500, 100, 10, 1]
    logits = torch.randn(16, 4, requires_grad=True)
    target = torch.randint(0, 4, (16,))
    loss = built("BalancedSoftmax", counts)(logits, target)
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float))
    manual = -(torch.log_softmax(logits + log_prior, 1)[torch.arange(16), target]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    # explicit formula: -log( n_y e^{z_y} / sum_j n_j e^{z_j} )
    z = logits.detach().double()
    n = torch.tensor(counts, dtype=torch.double)
    explicit = -torch.log(n[target] * z.gather(1, target[:, None]).squeeze(1).exp() / (n * z.exp()).sum(1)).mean()
    assert abs(loss.item() - explicit.item()) < 1e-5
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_balanced_softmax_equals_cross_entropy_when_balanced():
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(built("BalancedSoftmax", [7] * 5)(logits, target), F.cross_entropy(logits, target), atol=1e-6)


def test_balanced_softmax_computes_in_float32_under_low_precision_logits():
    logits, target = torch.randn(8, 3).bfloat16(), torch.randint(0, 3, (8,))
    assert built("BalancedSoftmax", [3, 2, 1])(logits, target).dtype == torch.float32


def test_balanced_softmax_rejects_a_class_without_images():
    with pytest.raises(BsdistError, match="positive count"):
        built("BalancedSoftmax", [10, 0, 3])


def test_build_loss_by_name():
    assert isinstance(built("BalancedSoftmax", [2, 1]), BalancedSoftmax)
    ce = built("CrossEntropyLoss", [2, 1])
    assert isinstance(ce, CrossEntropyLoss)
    logits, target = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    assert torch.allclose(ce(logits, target), F.cross_entropy(logits, target))


def _prior_worker(counts_by_rank):
    import torch.distributed as dist

    from bsdist.distributed import init_distributed
    env = init_distributed("cpu", 60)
    try:
        return broadcast_class_prior(counts_by_rank[env.rank], env)
    finally:
        dist.destroy_process_group()


def test_class_prior_is_broadcast_from_rank_0():
    counts = {0: 50, 1: 20, 2: 5}
    results, errors = run_ranks(_prior_worker, 2, [counts, counts], timeout=120)
    assert not errors
    assert results == [[50, 20, 5], [50, 20, 5]]


def test_every_rank_stops_when_a_rank_built_another_training_set():
    results, errors = run_ranks(_prior_worker, 2, [{0: 50, 1: 20}, {0: 50, 1: 21}], timeout=120)
    assert sorted(errors) == [0, 1]  # both ranks raise, neither hangs
    assert all("BsdistError" in e and "class counts differ" in e for e in errors.values())


def test_balanced_softmax_reduces_as_the_official_implementation_allows():
    counts, logits, target = [50, 5, 1], torch.randn(6, 3), torch.randint(0, 3, (6,))
    loss = built("BalancedSoftmax", counts)
    per_image = loss(logits, target, reduction="none")
    assert per_image.shape == (6,)
    assert torch.allclose(loss(logits, target, reduction="sum"), per_image.sum())
    assert torch.allclose(loss(logits, target), per_image.mean())


def test_the_reference_dataset_import_works():
    from bsdist.data import CIFAR10LT, CIFAR100LT, DigitsLT  # the reference's `from datasets import CIFAR10LT`
    assert (CIFAR10LT.num_classes, CIFAR100LT.num_classes, DigitsLT.num_classes) == (10, 100, 10)


def test_the_log_prior_is_computed_in_float64_and_rounded_once():
    # float32's log(7) and log(47) are one unit in the last place off the correctly rounded values
    log_prior = built("BalancedSoftmax", [7, 47, 1]).log_prior
    assert log_prior.tolist() == torch.tensor([math.log(7), math.log(47), 0.0]).tolist()


@pytest.fixture
def one_rank():
    from bsdist.distributed import init_distributed, shutdown
    env = init_distributed("cpu", 60)
    yield env
    shutdown()


def test_class_prior_of_a_single_process_is_its_counts_in_class_order(one_rank):
    prior = broadcast_class_prior({2: 5, 0: 50, 1: 20}, one_rank)
    assert prior == [50, 20, 5] and all(type(n) is int for n in prior)


def test_a_rank_whose_counts_differ_from_rank_0_s_raises(one_rank, monkeypatch):
    import bsdist.method
    # rank 0 counted one more image of class 1 than this rank
    monkeypatch.setattr(bsdist.method, "broadcast_from_main", lambda t: t + torch.tensor([0.0, 1.0], dtype=t.dtype))
    with pytest.raises(BsdistError, match=r"class counts differ from rank 0's\); make sure every node reads the same "
                                          r"DATASET\.datadir files"):
        broadcast_class_prior({0: 50, 1: 20}, one_rank)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_class_probabilities_as_targets_as_mixup_makes_them(name):
    """Soft targets (a mixing augmentation's) that are one-hot give the loss of the class indices."""
    counts, logits, target = [50, 5, 1], torch.randn(6, 3), torch.randint(0, 3, (6,))
    loss = built(name, counts)
    assert torch.allclose(loss(logits, F.one_hot(target, 3).float()), loss(logits, target), atol=1e-6)


def google_research_logit_adjusted_loss(logits, target, counts, tau):
    """google-research/logit_adjustment main.py, `loss` mode, written out in float64: the training label
    frequencies base_probs, logit_adjustments = tau * log(base_probs), then the softmax cross-entropy of
    logits + logit_adjustments, averaged over the batch."""
    base_probs = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    adjusted = logits + tau * torch.log(base_probs)
    return -(adjusted.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(adjusted, 1)).mean()


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5])
def test_the_logit_adjusted_loss_has_the_reference_implementation_s_values_and_gradients(tau):
    counts = [500, 120, 31, 7, 1]
    generator = torch.Generator().manual_seed(0)
    logits, target = 3 * torch.randn(16, 5, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    ours_logits, reference_logits = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours = built("LogitAdjustedLoss", counts, tau=tau)(ours_logits, target)
    reference = google_research_logit_adjusted_loss(reference_logits, target, counts, tau)
    ours.backward()
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(ours_logits.grad.double(), reference_logits.grad, atol=1e-7)


def test_the_logit_adjusted_loss_at_tau_1_is_balanced_softmax_and_at_tau_0_cross_entropy():
    counts, logits, target = [50, 20, 5, 1], torch.randn(8, 4), torch.randint(0, 4, (8,))
    balanced = built("BalancedSoftmax", counts)
    assert torch.equal(built("LogitAdjustedLoss", counts, tau=1.0)(logits, target), balanced(logits, target))
    assert torch.equal(built("LogitAdjustedLoss", counts, tau=0.0)(logits, target),
                       built("CrossEntropyLoss", counts)(logits, target))
    with pytest.raises(BsdistError, match="LogitAdjustedLoss needs a positive count for every class"):
        built("LogitAdjustedLoss", [3, 0, 1], tau=0.5)


def test_a_negative_loss_tau_is_refused_in_one_line():
    from bsdist import config
    with pytest.raises(BsdistError, match=r"^LOSS\.tau must be >= 0, got -0\.5$"):
        config.validate(config.load(None, ["LOSS.tau", "-0.5"]))


def test_a_run_trains_with_the_logit_adjusted_loss_end_to_end(tmp_path):
    import json
    import os

    import tiny_model
    from bsdist import config
    from bsdist.train import main
    tiny_model.register()
    cfg = config.validate(config.load("configs/demo.yaml", [
        "DEFAULT.savedir", str(tmp_path), "TRAIN.epochs", "1", "TRAIN.device", "cpu", "TRAIN.compile", "false",
        "SCHEDULER.params.warmup_epochs", "0", "MODEL.name", "tiny", "LOSS.name", "LogitAdjustedLoss",
        "LOSS.tau", "1.5"]))
    results = main(cfg)
    assert os.path.basename(config.run_dir(cfg)).startswith("LogitAdjustedLoss-")
    with open(os.path.join(config.run_dir(cfg), "config.yaml")) as f:
        assert "tau: 1.5" in f.read()
    with open(os.path.join(config.run_dir(cfg), "results.json")) as f:
        assert json.load(f)["last"]["acc"] == results["last"]["acc"] > 0
