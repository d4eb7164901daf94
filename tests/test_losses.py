import dataclasses
import math
import re

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


# losses whose authors' code defines no form for class probabilities: they refuse them rather than guess one
SOURCE_WITHOUT_SOFT_TARGETS = {"LDAMLoss", "ClassBalancedLoss", "FocalLoss"}


@pytest.mark.parametrize("name", sorted(set(LOSSES) - SOURCE_WITHOUT_SOFT_TARGETS))
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


# The long-tail losses of issue 24, each against its authors' code written out in float64 plain torch.

def cao_ldam_drw_loss(x, target, cls_num_list, max_m, s, epoch, drw_epoch, beta):
    """kaidic/LDAM-DRW: cifar_train.py lines 199-206 (DRW's per_cls_weights: betas [0, beta], idx
    epoch // drw_epoch), losses.py LDAMLoss lines 26-43 (margins, x - batch_m on the target, s * output,
    cross_entropy with weight)."""
    betas = [0, beta]
    counts = torch.tensor(cls_num_list, dtype=torch.float64)
    effective_num = 1.0 - torch.pow(torch.tensor(betas[min(epoch // drw_epoch, 1)], dtype=torch.float64), counts)
    per_cls_weights = (1.0 - betas[min(epoch // drw_epoch, 1)]) / effective_num
    per_cls_weights = per_cls_weights / per_cls_weights.sum() * len(cls_num_list)
    m_list = 1.0 / torch.sqrt(torch.sqrt(counts))
    m_list = m_list * (max_m / m_list.max())
    index = torch.zeros_like(x, dtype=torch.bool)
    index.scatter_(1, target.view(-1, 1), True)
    batch_m = torch.matmul(m_list[None, :], index.double().transpose(0, 1)).view(-1, 1)
    output = torch.where(index, x - batch_m, x)
    return F.cross_entropy(s * output, target, weight=per_cls_weights)


def cui_class_balanced_loss(logits, label, img_num_per_cls, beta, loss_type, gamma):
    """richardaecn/class-balanced-loss src/cifar_main.py: the weights (lines 428-430), their per-image
    tiling (lines 323-330), the three losses (lines 332-342; tf.losses.softmax_cross_entropy's default
    reduction: the weighted sum over the number of non-zero weights) and focal_loss (lines 242-265)."""
    num_classes = logits.shape[1]
    effective_num = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64),
                                    torch.tensor(img_num_per_cls, dtype=torch.float64))
    weights = (1.0 - beta) / effective_num
    weights = weights / weights.sum() * num_classes
    one_hot_labels = F.one_hot(label, num_classes).double()
    weights = (weights[None, :].repeat(len(label), 1) * one_hot_labels).sum(1)[:, None].repeat(1, num_classes)
    sigmoid_cross_entropy = F.binary_cross_entropy_with_logits(logits, one_hot_labels, reduction="none")
    if loss_type == "softmax":
        per_image = -(one_hot_labels * torch.log_softmax(logits, 1)).sum(1)
        image_weights = weights.mean(1)
        return (image_weights * per_image).sum() / (image_weights != 0).sum()
    if loss_type == "sigmoid":
        return (weights * sigmoid_cross_entropy).sum() / one_hot_labels.sum()
    modulator = 1.0 if gamma == 0.0 else torch.exp(-gamma * one_hot_labels * logits
                                                    - gamma * torch.log1p(torch.exp(-1.0 * logits)))
    return (weights * modulator * sigmoid_cross_entropy).sum() / one_hot_labels.sum()


def cao_focal_loss(logits, target, gamma):
    """kaidic/LDAM-DRW losses.py lines 7-21: focal_loss(cross_entropy(reduction='none'), gamma)."""
    input_values = F.cross_entropy(logits, target, reduction="none")
    p = torch.exp(-input_values)
    return ((1 - p) ** gamma * input_values).mean()


def assert_matches_reference(ours_loss, reference_fn, scale=3.0, seed=0, classes=5):
    """ours_loss(logits, target) against reference_fn(logits in float64, target): values and gradients."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(16, classes, generator=generator)
    target = torch.randint(0, classes, (16,), generator=generator)
    ours_logits, reference_logits = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours, reference = ours_loss(ours_logits, target), reference_fn(reference_logits, target)
    ours.backward()
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(ours_logits.grad.double(), reference_logits.grad, rtol=1e-4, atol=1e-7)


COUNTS = [5000, 1200, 310, 70, 12]


@pytest.mark.parametrize("epoch", [0, 2, 3, 7])
@pytest.mark.parametrize("max_margin,scale", [(0.5, 30.0), (0.3, 10.0)])
def test_ldam_drw_has_the_reference_implementation_s_values_and_gradients(epoch, max_margin, scale):
    loss = built("LDAMLoss", COUNTS, max_margin=max_margin, scale=scale, drw_epoch=3, beta=0.9999)
    loss.context.epoch = epoch
    # cosine logits, as NormedLinear gives them
    assert_matches_reference(loss, lambda x, t: cao_ldam_drw_loss(x, t, COUNTS, max_margin, scale, epoch, 3, 0.9999),
                             scale=0.4)


def test_ldam_re_weights_from_drw_epoch_on_with_one_tensor_built_once_and_never_with_drw_epoch_null():
    loss = built("LDAMLoss", COUNTS, drw_epoch=2)
    weights = [loss.class_weights() for loss.context.epoch in range(4)]
    assert weights[0] is None and weights[1] is None and weights[2] is weights[3] is loss.drw_weights
    assert loss.drw_weights.sum().item() == pytest.approx(len(COUNTS)) and loss.drw_weights[-1] > loss.drw_weights[0]
    never = built("LDAMLoss", COUNTS, drw_epoch=None)
    never.context.epoch = 10**6
    assert never.class_weights() is None


def test_ldam_s_margins_go_as_the_inverse_fourth_root_of_the_counts_the_rarest_class_s_being_max_margin():
    margins = built("LDAMLoss", [10000, 625, 16, 1], max_margin=0.5).margins
    assert margins.tolist() == pytest.approx([0.05, 0.1, 0.25, 0.5], rel=1e-6)


@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid", "focal"])
@pytest.mark.parametrize("beta,gamma", [(0.9999, 1.0), (0.999, 2.0), (0.0, 0.5), (0.99, 0.0)])
def test_the_class_balanced_loss_has_the_reference_implementation_s_values_and_gradients(loss_type, beta, gamma):
    loss = built("ClassBalancedLoss", COUNTS, beta=beta, gamma=gamma, cb_loss_type=loss_type)
    assert_matches_reference(loss, lambda x, t: cui_class_balanced_loss(x, t, COUNTS, beta, loss_type, gamma))


def test_class_balanced_weights_sum_to_the_number_of_classes_and_beta_0_is_unweighted():
    from bsdist.losses.class_balanced import effective_number_weights
    weights = effective_number_weights(COUNTS, 0.9999)
    assert weights.sum().item() == pytest.approx(5) and weights.argsort().tolist() == [0, 1, 2, 3, 4]
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    unweighted = built("ClassBalancedLoss", COUNTS, beta=0.0, cb_loss_type="softmax")
    assert torch.allclose(unweighted(logits, target), F.cross_entropy(logits, target), atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_the_focal_loss_has_the_reference_implementation_s_values_and_gradients(gamma):
    assert_matches_reference(built("FocalLoss", COUNTS, gamma=gamma), lambda x, t: cao_focal_loss(x, t, gamma))
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    if gamma == 0.0:
        assert torch.allclose(built("FocalLoss", COUNTS, gamma=0.0)(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("name", sorted(SOURCE_WITHOUT_SOFT_TARGETS))
def test_a_loss_whose_source_has_no_soft_target_form_refuses_class_probabilities_in_one_line(name):
    loss = built(name, [50, 5, 1])
    with pytest.raises(BsdistError, match=rf"^{name} takes class indices as targets, not class probabilities "
                                          r"\(shape \(6, 3\)\)"):
        loss(torch.randn(6, 3), F.one_hot(torch.randint(0, 3, (6,)), 3).float())


@pytest.mark.parametrize("name", ["LDAMLoss", "ClassBalancedLoss"])
def test_a_class_without_images_is_refused_by_the_losses_that_weigh_by_counts(name):
    with pytest.raises(BsdistError, match=f"{name} needs a positive count for every class"):
        built(name, [3, 0, 1])


@pytest.mark.parametrize("key,value,problem", [
    ("LOSS.beta", "1.0", "must be in [0, 1), got 1.0"), ("LOSS.beta", "-0.1", "must be in [0, 1), got -0.1"),
    ("LOSS.gamma", "-1", "must be >= 0, got -1.0"), ("LOSS.max_margin", "0", "must be > 0, got 0.0"),
    ("LOSS.scale", "-30", "must be > 0, got -30.0"), ("LOSS.drw_epoch", "-1", "must be >= 0, got -1"),
])
def test_a_long_tail_loss_setting_out_of_range_is_refused_in_one_line(key, value, problem):
    from bsdist import config
    with pytest.raises(BsdistError, match="^" + re.escape(f"{key} {problem}") + "$"):
        config.validate(config.load(None, [key, value]))


@pytest.mark.parametrize("key,value", [("LOSS.cb_loss_type", "softmax_focal"), ("MODEL.classifier", "normed")])
def test_a_long_tail_choice_not_offered_is_refused_naming_the_choices(key, value):
    from bsdist import config
    with pytest.raises(BsdistError, match="^" + re.escape(key) + r".*" + re.escape(value)):
        config.validate(config.load(None, [key, value]))
