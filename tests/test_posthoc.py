"""Results a reviewer trusts beyond one training run: the class-balanced sampler, decoupled stage 2 (cRT)
on a frozen backbone, post-hoc logit adjustment and tau-normalisation (launch.py --evaluate), and the
report rows they give."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import tiny_model
from bsdist import BsdistError, checkpoint, config
from bsdist.data import ClassBalancedSampler
from bsdist.distributed import init_distributed, shutdown
from bsdist.posthoc import TAU_GRID, _features, _metrics, _tuned, evaluate_run, logit_adjusted, tau_normalised
from bsdist.report import aggregate, collect
from bsdist.runtime import Runtime
from bsdist.train import main
from spawn import run_ranks
from paths import ROOT

tiny_model.register()


def demo_cfg(savedir, *overrides):
    return config.validate(config.load(os.path.join(ROOT, "configs/demo.yaml"), [
        "DEFAULT.savedir", str(savedir), "TRAIN.epochs", "2", "TRAIN.device", "cpu", "TRAIN.compile", "false",
        "SCHEDULER.params.warmup_epochs", "0", "MODEL.name", "tiny_fc", "DATASET.val_per_cls", "10", *overrides]))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A finished stage-1 run with a validation split."""
    cfg = demo_cfg(tmp_path_factory.mktemp("runs"), "LOSS.name", "CrossEntropyLoss")
    main(cfg)
    return cfg


class Targets:
    def __init__(self, targets):
        self.targets = np.asarray(targets)

    def __len__(self):
        return len(self.targets)


def test_the_class_balanced_sampler_draws_every_class_equally_and_shards_one_global_order():
    data = Targets([0] * 50 + [1] * 10 + [2] * 3 + [4] * 2)  # class 3 has no image: it is never drawn
    one = ClassBalancedSampler(data, 1, 0, seed=5)
    one.set_epoch(2)
    order = list(one)
    counts = np.bincount(data.targets[order], minlength=5)
    assert sorted(counts.tolist()) == [0, 16, 16, 16, 17] and counts[3] == 0  # 65 draws over 4 classes
    # both images of 4
    assert set(order) <= set(range(65)) and len(set(np.asarray(order)[data.targets[order] == 4])) == 2
    shards = []
    for rank in range(2):
        s = ClassBalancedSampler(data, 2, rank, seed=5)
        s.set_epoch(2)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 32 and len(one) == 65
    assert [i for pair in zip(*shards) for i in pair] == order[:64]  # rank r takes r, r + 2, ... of the same order
    again = ClassBalancedSampler(data, 1, 0, seed=5)
    again.set_epoch(2)
    assert list(again) == order
    again.set_epoch(3)
    assert list(again) != order


def test_the_class_balanced_sampler_gives_equal_expected_counts_per_image_within_a_class():
    data = Targets([0] * 90 + [1] * 10)
    s = ClassBalancedSampler(data, 1, 0, seed=0)
    draws = np.zeros(100)
    for epoch in range(300):
        s.set_epoch(epoch)
        np.add.at(draws, list(s), 1)
    # per epoch 50 draws per class: 50/90 per head image, 5 per tail image
    assert draws[:90].mean() == pytest.approx(300 * 50 / 90) and draws[90:].mean() == pytest.approx(300 * 5)
    assert draws[90:].std() / draws[90:].mean() < 0.05 and draws[:90].std() / draws[:90].mean() < 0.2


def test_tau_zero_leaves_logit_adjusted_predictions_unchanged_and_tau_norm_divides_rows_by_their_norm():
    torch.manual_seed(0)
    logits, log_prior = torch.randn(64, 10), torch.rand(10).log()
    assert torch.equal(logit_adjusted(logits, log_prior, 0.0), logits)
    assert not torch.equal(logit_adjusted(logits, log_prior, 1.0).argmax(1), logits.argmax(1))
    features, weight = torch.randn(64, 32), torch.randn(10, 32) * torch.arange(1, 11).view(10, 1)
    assert torch.allclose(tau_normalised(features, weight, 0.0), features @ weight.T)
    assert torch.allclose(tau_normalised(features, weight, 1.0),
                          features @ (weight / weight.norm(dim=1, keepdim=True)).T)


def test_tau_is_chosen_by_validation_bcr_the_smallest_on_a_tie():
    bcr = {tau: 0.5 + (0.1 if tau in (0.7, 1.3) else 0.0) for tau in TAU_GRID}
    chosen = _tuned(lambda tau: {"val": {"bcr": bcr[tau]}, "test": {"bcr": -tau}})
    assert chosen["tau"] == 0.7 and chosen["test"]["bcr"] == -0.7 and chosen["grid"]["1.3"] == pytest.approx(0.6)


def test_a_split_s_metrics_are_the_same_made_a_few_rows_at_a_time_and_an_empty_shard_has_none():
    """A rank's logits are made in slices (8,142 classes would not fit at once), and a rank whose shard of a
    small split is empty gives empty features instead of failing alone (its peers would then wait)."""
    generator = torch.Generator().manual_seed(0)
    features, weight = torch.randn(50, 6, generator=generator), torch.randn(4, 6, generator=generator)
    targets = torch.randint(0, 4, (50,), generator=generator)
    init_distributed("cpu", 60)
    try:
        whole, sliced = (_metrics(lambda x: x @ weight.T, features, targets, 4, [40, 30, 20, 10], rows=rows)
                         for rows in (4096, 7))
        classifier = torch.nn.Linear(6, 4)
        runtime = Runtime(torch.device("cpu"), 1, "no", False, False, "", "gloo", "")
        empty = _features(torch.nn.Sequential(classifier), classifier, [], lambda x: x, runtime)
    finally:
        shutdown()
    assert whole["confusion"] == sliced["confusion"] and sum(map(sum, whole["confusion"])) == 50
    assert sliced["nll"] == pytest.approx(whole["nll"], rel=1e-6) and sliced["ece"] == pytest.approx(whole["ece"])
    assert empty[0].shape == (0, 6) and empty[1].shape == (0,) and empty[1].dtype == torch.long


def test_evaluate_gives_the_run_s_own_numbers_plainly_and_tunes_tau_on_validation(stage1):
    run_dir = config.run_dir(stage1)
    variants = evaluate_run(run_dir, ["logit-adjust", "tau-norm"])
    with open(os.path.join(run_dir, "results.json")) as f:
        best = json.load(f)["best"]
    with open(os.path.join(run_dir, "evaluate.json")) as f:
        written = json.load(f)
    assert list(written["variants"]) == ["plain", "logit-adjust-tau1", "logit-adjust", "tau-norm"]
    plain = written["variants"]["plain"]["test"]
    assert plain["confusion"] == best["confusion"] and plain["ece"] == pytest.approx(best["ece"])
    la = written["variants"]["logit-adjust"]
    assert la["grid"]["0"] == pytest.approx(written["variants"]["plain"]["val"]["bcr"])  # tau 0 is the plain model
    assert la["val"]["bcr"] == pytest.approx(max(la["grid"].values())) and la["tau"] in TAU_GRID
    assert la["test"]["num_images"] == 500 and set(la["test"]) >= {"acc", "bcr", "many", "medium", "few", "ece", "nll"}
    assert variants["logit-adjust-tau1"]["tau"] == 1.0

    rows = aggregate(collect(os.path.dirname(run_dir))[0])
    assert [r["method"] for r in rows] == ["CE", "CE + LA", "CE + tau-norm", "CE + LA (tau 1)"]
    assert rows[1]["bcr_mean"] == pytest.approx(la["test"]["bcr"]) and rows[1]["tau_mean"] == la["tau"]


def test_evaluate_refuses_to_tune_on_the_test_set_and_to_change_what_is_measured(stage1, tmp_path):
    no_val = demo_cfg(tmp_path, "TRAIN.epochs", "1", "DATASET.val_per_cls", "0")
    main(no_val)
    with pytest.raises(BsdistError, match="no validation split .*tuning tau on the test set would select on it"):
        evaluate_run(config.run_dir(no_val), ["logit-adjust"])
    evaluate_run(config.run_dir(no_val), [])  # a plain evaluation needs no tuning
    with pytest.raises(BsdistError, match="DATASET.imbalance_factor would change what is measured"):
        evaluate_run(config.run_dir(stage1), [], ["DATASET.imbalance_factor", "50"])
    with pytest.raises(BsdistError, match="holds no finished run"):
        evaluate_run(str(tmp_path), [])


def _evaluate_worker(run_dir):
    import tiny_model
    tiny_model.register()
    return evaluate_run(run_dir, ["logit-adjust"])


def test_two_processes_evaluate_exactly_as_one(stage1):
    run_dir = config.run_dir(stage1)
    one = evaluate_run(run_dir, ["logit-adjust"])
    results, errors = run_ranks(_evaluate_worker, 2, run_dir)
    assert not errors, errors
    for name in one:
        for split in ("val", "test"):
            assert results[0][name][split]["confusion"] == one[name][split]["confusion"], (name, split)
            assert np.allclose(results[0][name][split]["calibration"], one[name][split]["calibration"], rtol=1e-6)
        assert results[0][name]["tau"] == one[name]["tau"]


def test_stage_two_retrains_only_the_classifier_of_the_frozen_stage_one_model(stage1):
    cfg = demo_cfg(os.path.dirname(os.path.dirname(os.path.dirname(config.run_dir(stage1)))), "CRT.stage1",
                   config.run_dir(stage1), "DATASET.sampler", "class_balanced", "TRAIN.epochs", "1",
                   "LOSS.name", "CrossEntropyLoss")
    assert config.run_dir(cfg).endswith("CrossEntropyLoss-exp-IF_10-cRT-CrossEntropyLoss")
    results = main(cfg)
    assert results["stage1"] == os.path.abspath(config.run_dir(stage1))
    before = checkpoint.load(os.path.join(config.run_dir(stage1), "best.pt"))["model"]
    after = checkpoint.load(os.path.join(config.run_dir(cfg), "last.pt"))["model"]
    assert set(after) == set(before) - {"features.1.num_batches_tracked"}  # FrozenBatchNorm2d counts nothing
    for key, value in after.items():
        assert torch.equal(value, before[key]) != key.startswith("fc."), key  # BatchNorm statistics included
    rows = aggregate(collect(os.path.dirname(config.run_dir(cfg)))[0])
    assert "CE + cRT" in [r["method"] for r in rows]


@pytest.mark.parametrize("change, message", [
    (["DATASET.imbalance_factor", "20"], "was trained with DATASET.imbalance_factor 10.0 and this run has 20.0"),
    (["CRT.stage1", "nowhere"], "CRT.stage1 nowhere is not a directory"),
    (["MODEL.stem", "imagenet"], "was trained with MODEL.stem cifar and this run has imagenet"),
])
def test_a_stage_two_that_does_not_fit_its_stage_one_is_refused_in_one_line(stage1, tmp_path, change, message):
    from bsdist.rundir import stage1_checkpoint
    cfg = demo_cfg(tmp_path, "CRT.stage1", config.run_dir(stage1), *change)
    with pytest.raises(BsdistError, match=message):
        stage1_checkpoint(cfg)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(config.dump(stage1))
    with pytest.raises(BsdistError, match="has not finished"):
        stage1_checkpoint(demo_cfg(tmp_path, "CRT.stage1", str(unfinished)))


def test_a_stage_two_resumes_where_an_uninterrupted_one_ends(stage1, tmp_path, monkeypatch):
    from runs import run_until
    common = ["CRT.stage1", config.run_dir(stage1), "DATASET.sampler", "class_balanced", "TRAIN.epochs", "2",
              "TRAIN.ckpt_every_steps", "2", "TRAIN.resume", "auto", "OPTIMIZER.momentum", "0.9"]
    straight = demo_cfg(tmp_path / "straight", *common)
    main(straight)
    cfg = demo_cfg(tmp_path / "resumed", *common)
    run_until(monkeypatch, cfg, lambda name, state: state["epoch"] == 1 and state["progress"]["step"] == 2)
    main(cfg)
    a = checkpoint.load(os.path.join(config.run_dir(cfg), "last.pt"))["model"]
    b = checkpoint.load(os.path.join(config.run_dir(straight), "last.pt"))["model"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from" in open(os.path.join(config.run_dir(cfg), "log.txt")).read()


def test_a_damaged_stage_1_model_is_refused_by_evaluate_and_by_stage_2_in_one_line(stage1, tmp_path):
    from test_checkpoint import flip_bytes
    damaged = str(tmp_path / "stage1")
    shutil.copytree(config.run_dir(stage1), damaged)  # a copy that rotted
    flip_bytes(os.path.join(damaged, "best.pt"))
    with pytest.raises(checkpoint.Damaged, match=r"checkpoint .*stage1/best.pt does not match its digest"):
        evaluate_run(damaged, [])
    stage2 = demo_cfg(tmp_path, "CRT.stage1", damaged, "DATASET.sampler", "class_balanced", "DEFAULT.exp_name", "crt")
    with pytest.raises(BsdistError, match=r"stage1/best.pt does not match its digest"):
        main(stage2)
    assert not os.path.exists(config.run_dir(stage2))
