"""End-to-end runs of bsdist.train.main in this process (world size 1, the same code path as torchrun)."""

import csv
import gc
import glob
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tiny_model
from runs import run_until, snapshot
from bsdist import BsdistError, checkpoint, config
from bsdist.data.longtail import long_tail_counts
from bsdist.models import resnet18
from bsdist.optim import LRFactor
from bsdist.train import main

tiny_model.register()


def demo_cfg(savedir, *overrides):
    """The demo, selecting on the test set unless a test asks for a validation split."""
    return config.validate(config.load("configs/demo.yaml", [
        "DEFAULT.savedir", str(savedir), "TRAIN.epochs", "2", "TRAIN.device", "cpu", "TRAIN.compile", "false",
        "DATASET.val_per_cls", "0",
        "TRAIN.log_interval", "3", "SCHEDULER.params.warmup_epochs", "0", *overrides]))


def run_dir(cfg):
    return config.run_dir(cfg)


def read_csv(cfg):
    with open(os.path.join(run_dir(cfg), "metrics.csv")) as f:
        return list(csv.DictReader(f))


def events(cfg):
    acc = EventAccumulator(run_dir(cfg), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_a_run_writes_checkpoints_metrics_results_and_tensorboard(tmp_path):
    cfg = demo_cfg(tmp_path)
    results = main(cfg)
    d = run_dir(cfg)
    assert d == str(tmp_path / "DigitsLT" / "resnet18" / "BalancedSoftmax-exp-IF_10")
    for name in ("config.yaml", "metrics.csv", "results.json", "last.pt", "best.pt", "log.txt", "reliability.png"):
        assert os.path.isfile(os.path.join(d, name)), name
    assert len(glob.glob(os.path.join(d, "events.out.tfevents.*"))) == 1
    assert config.validate(config.load(os.path.join(d, "config.yaml"))) == cfg  # the merged config round-trips

    with open(os.path.join(d, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    for key in ("best", "last"):
        r = saved[key]
        assert r["num_images"] == 500 and r["selected_on"] == "test"
        assert len(r["per_class_recall"]) == 10 and len(r["confusion"]) == 10
        assert r["bcr"] == pytest.approx(sum(r["per_class_recall"]) / 10)
        assert {"acc", "many", "medium", "few", "loss", "epoch", "ece", "nll"} <= set(r)
        assert r["nll"] == r["loss"] and 0 < r["ece"] < 1 and sum(b[0] for b in r["calibration"]) == 500
    assert saved["num_per_cls"] == [120, 92, 71, 55, 43, 33, 25, 20, 15, 12]
    assert saved["last"]["epoch"] == 2

    rows = read_csv(cfg)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["test_acc"]) == pytest.approx(saved["last"]["acc"])
    assert float(rows[-1]["test_ece"]) == pytest.approx(saved["last"]["ece"])

    # best.pt is a second name of last.pt's file when the last epoch was the best
    assert os.path.samefile(os.path.join(d, "best.pt"), os.path.join(d, "last.pt")) == (saved["best"]["epoch"] == 2)
    ckpt = checkpoint.load(os.path.join(d, "last.pt"))
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "rng", "best"} <= set(ckpt)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    resnet18(10, 1).load_state_dict(ckpt["model"])  # strict: loads into a plain model

    acc = events(cfg)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "test/acc", "test/bcr", "test/many", "test/medium",
            "test/few", "test/recall/000", "test/recall/009", "train/acc", "train/epoch_acc",
            "train/epoch_seconds"} <= scalars
    from tensorboard.plugins.custom_scalar import layout_pb2
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert charts["test: many / medium / few-shot recall"] == ["test/many", "test/medium", "test/few"]
    assert float(rows[-1]["train_acc"]) == pytest.approx(acc.Scalars("train/epoch_acc")[-1].value)
    norms = [e.value for e in acc.Scalars("train/grad_norm")]
    assert len(norms) == len(acc.Scalars("train/loss")) and all(0 < n < 1e3 for n in norms)
    assert {"test/confusion", "test/reliability"} <= set(acc.Tags()["images"])
    assert acc.Scalars("test/ece")[-1].value == pytest.approx(saved["last"]["ece"])
    assert [e.value for e in acc.Scalars("test/acc")][-1] == pytest.approx(saved["last"]["acc"])
    assert_hparams(acc, saved)
    assert_lr_is_the_one_each_step_used(cfg, rows, acc)


def assert_lr_is_the_one_each_step_used(cfg, rows, acc):
    """metrics.csv, TensorBoard and the console log the learning rate the optimiser used for the step they
    describe: the schedule's value before the step, not the one the scheduler moved on to after it (which at
    the end of a cosine cycle is the next cycle's peak)."""
    factor = LRFactor(cfg, int(rows[0]["step"]))

    def used(step):  # steps count from 1; the schedule from 0
        return cfg.OPTIMIZER.lr * factor(step - 1)
    assert [float(r["lr"]) for r in rows] == [used(int(r["step"])) for r in rows]
    assert float(rows[-1]["lr"]) < cfg.OPTIMIZER.lr / 10  # the cycle's end, not its restart
    logged = acc.Scalars("train/lr")
    assert len(logged) > 2 and all(e.value == pytest.approx(used(e.step), rel=1e-6) for e in logged)
    lines = [line.split() for line in open(os.path.join(run_dir(cfg), "log.txt")) if " lr " in line]
    for words in lines:
        epoch, step, steps = int(words[2].split("/")[0]), *map(int, words[4].split("/"))
        assert words[words.index("lr") + 1] == f"{used((epoch - 1) * steps + step):.5f}", words
    assert len(lines) == len(logged)


def assert_hparams(acc, results):
    """The hparams table: the telling settings first, with their domains; the selected model's metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from bsdist.output import HPARAMS
    data = lambda tag: plugin_data_pb2.HParamsPluginData.FromString(  # noqa: E731
        acc.SummaryMetadata(tag).plugin_data.content)
    experiment = data("_hparams_/experiment").experiment
    names = [h.name for h in experiment.hparam_infos]
    assert names == list(HPARAMS)
    # TensorBoard shows the five that sort first: they must be the ones that tell runs apart
    assert sorted(names)[:5] == ["DATASET.imbalance_factor", "DATASET.name", "DEFAULT.seed", "LOSS.name",
                                 "OPTIMIZER.lr"]
    domains = {h.name: [v.string_value for v in h.domain_discrete.values] for h in experiment.hparam_infos}
    from bsdist.losses import LOSSES
    assert (domains["LOSS.name"] == list(LOSSES)  # every loss the registry holds
            and domains["TRAIN.mixed_precision"][0] == "auto")
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics[:6] == ["test/best_bcr", "test/best_acc", "test/best_many", "test/best_medium", "test/best_few",
                           "test/best_epoch"]
    assert not any(m.startswith("val/") for m in metrics)  # no validation split: no empty val columns
    session = data("_hparams_/session_start_info").session_start_info.hparams
    assert (session["LOSS.name"].string_value == "BalancedSoftmax"
            and session["TRAIN.mixed_precision"].string_value == "no")
    assert acc.Scalars("test/best_bcr")[-1].value == pytest.approx(results["best"]["bcr"])
    assert acc.Scalars("test/best_epoch")[-1].value == results["best"]["epoch"]
    groups = sorted({tag.split("/")[0] for tag in acc.Tags()["scalars"]})
    assert groups[:2] == ["test", "train"]  # the two groups TensorBoard's Time Series page opens


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    common = ["TRAIN.epochs", "3", "OPTIMIZER.momentum", "0.9", "TRAIN.resume", "auto"]
    straight = main(demo_cfg(tmp_path / "straight", *common))

    cfg = demo_cfg(tmp_path / "interrupted", *common)
    run_until(monkeypatch, cfg, lambda name, state: name == "last.pt" and state["epoch"] == 2)
    resumed = main(cfg)

    a = checkpoint.load(os.path.join(run_dir(demo_cfg(tmp_path / "straight", *common)), "last.pt"))["model"]
    b = checkpoint.load(os.path.join(run_dir(cfg), "last.pt"))["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["last"]["confusion"] == straight["last"]["confusion"]
    assert resumed["best"]["epoch"] == straight["best"]["epoch"]
    assert [r["epoch"] for r in read_csv(cfg)] == ["1", "2", "3"]
    steps = [e.step for e in events(cfg).Scalars("train/loss")]
    assert steps == sorted(set(steps))  # nothing logged twice


def ddp_objects():
    return sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())


def test_the_process_group_is_gone_when_main_returns_or_fails(tmp_path, monkeypatch):
    """DDP holds the process group; left to interpreter exit, gloo's teardown aborted the process (exit -6)."""
    gc.collect()
    main(demo_cfg(tmp_path / "ok", "TRAIN.epochs", "1"))
    assert ddp_objects() == 0 and not torch.distributed.is_initialized()
    run_until(monkeypatch, demo_cfg(tmp_path / "failed"), lambda name, state: name == "last.pt")
    assert ddp_objects() == 0 and not torch.distributed.is_initialized()


def test_an_existing_run_is_never_overwritten(tmp_path):
    cfg = demo_cfg(tmp_path, "TRAIN.epochs", "1")
    main(cfg)
    before = snapshot(run_dir(cfg))
    with pytest.raises(BsdistError, match="already holds a run.*TRAIN.resume auto"):
        main(cfg)
    assert snapshot(run_dir(cfg)) == before


def test_resume_true_insists_on_a_checkpoint(tmp_path):
    cfg = demo_cfg(tmp_path, "TRAIN.epochs", "1", "TRAIN.resume", "true")
    with pytest.raises(BsdistError, match="TRAIN.resume true but .* holds no checkpoint.*TRAIN.resume auto"):
        main(cfg)
    assert not os.path.exists(run_dir(cfg))


def test_resuming_a_finished_run_returns_its_results_without_training(tmp_path):
    cfg = demo_cfg(tmp_path, "TRAIN.epochs", "1", "TRAIN.resume", "auto")
    first = main(cfg)
    before = {p: h for p, h in snapshot(run_dir(cfg)).items() if not p.endswith("log.txt")}
    assert main(cfg) == json.loads(json.dumps(first))
    after = {p: h for p, h in snapshot(run_dir(cfg)).items() if not p.endswith("log.txt") and "tfevents" not in p}
    assert after == {p: h for p, h in before.items() if "tfevents" not in p}


def test_resume_refuses_a_changed_config(tmp_path):
    main(demo_cfg(tmp_path, "TRAIN.epochs", "1", "TRAIN.resume", "auto", "DEFAULT.exp_name", "run"))
    changed = demo_cfg(tmp_path, "TRAIN.epochs", "1", "TRAIN.resume", "auto", "DEFAULT.exp_name", "run",
                       "LOSS.name", "CrossEntropyLoss")
    with pytest.raises(BsdistError, match="LOSS.name differ"):
        main(changed)


def test_validation_split_selects_the_best_model_without_the_test_set(tmp_path):
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny", "DATASET.val_per_cls", "4", "TRAIN.epochs", "6",
                   "OPTIMIZER.lr", "0.5")
    results = main(cfg)
    assert results["best"]["selected_on"] == "val"
    rows = read_csv(cfg)
    assert len({r["val_bcr"] for r in rows}) > 1  # the choice is a real one
    best_row = max(rows, key=lambda r: float(r["val_bcr"]))  # first maximum wins ties, as in training
    assert results["best"]["epoch"] == int(best_row["epoch"])
    assert results["best"]["acc"] == pytest.approx(float(best_row["test_acc"]))
    # img_max is 120 - 4 held out per class
    assert (checkpoint.load(os.path.join(run_dir(cfg), "best.pt"))["num_per_cls"]
            == long_tail_counts(1160, 10, "exp", 10))


def test_loss_as_checkpoint_metric_saves_the_lowest_loss(tmp_path):
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny", "TRAIN.ckp_metric", "loss", "TRAIN.epochs", "6",
                   "OPTIMIZER.lr", "0.5")
    results = main(cfg)
    rows = read_csv(cfg)
    assert min(rows, key=lambda r: float(r["test_loss"]))["epoch"] != "1"  # an improvement was saved
    best_row = min(rows, key=lambda r: float(r["test_loss"]))
    assert results["best"]["epoch"] == int(best_row["epoch"])
    assert checkpoint.load(os.path.join(run_dir(cfg), "best.pt"))["epoch"] == int(best_row["epoch"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_like_fp32(tmp_path, precision):
    runs, norms = {}, {}
    for name in ("no", precision):
        cfg = demo_cfg(tmp_path / name, "MODEL.name", "tiny", "TRAIN.mixed_precision", name, "TRAIN.epochs", "2")
        runs[name] = (main(cfg), [float(r["train_loss"]) for r in read_csv(cfg)])
        norms[name] = [e.value for e in events(cfg).Scalars("train/grad_norm")]
    (fp32, fp32_losses), (mixed, mixed_losses) = runs["no"], runs[precision]
    # the norm of the true gradients: fp16's are unscaled first (else they would be 65,536 times larger)
    assert norms[precision] == pytest.approx(norms["no"], rel=0.05)
    assert mixed_losses[1] < mixed_losses[0]  # it learns: no step was lost to the scaler or to rounding
    assert mixed_losses == pytest.approx(fp32_losses, rel=0.05)  # and like fp32, from the same initial weights
    assert abs(mixed["last"]["acc"] - fp32["last"]["acc"]) < 0.1
    scaler = checkpoint.load(os.path.join(run_dir(cfg), "last.pt"))["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")  # a gradient scaler only for fp16


@pytest.mark.slow
def test_compiled_model_trains_without_recompiling_and_saves_plain_keys(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    import bsdist.trainer
    graphs_at_eval = []
    original = bsdist.trainer.evaluate

    def counting_evaluate(*args, **kwargs):
        result = original(*args, **kwargs)
        graphs_at_eval.append(counters["stats"]["unique_graphs"])
        return result
    monkeypatch.setattr(bsdist.trainer, "evaluate", counting_evaluate)
    # 486 images: the test set of 500 in batches of 300 ends with a short batch
    cfg = demo_cfg(tmp_path, "TRAIN.compile", "true", "TRAIN.epochs", "2", "DATASET.test_batch_size", "300")
    main(cfg)
    assert len(graphs_at_eval) == 2 and graphs_at_eval[0] > 0
    assert graphs_at_eval[1] == graphs_at_eval[0]  # the second epoch and the short batches compiled nothing new
    state = checkpoint.load(os.path.join(run_dir(cfg), "last.pt"))["model"]
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state)
    resnet18(10, 1).load_state_dict(state)


def test_evaluation_gets_a_graph_of_its_own_fixed_batch_size(tmp_path, monkeypatch):
    """Automatic dynamic shapes would compile evaluation's new batch size as a graph for any batch size."""
    import torch._dynamo
    graphs = []  # per graph compiled: whether any input has a symbolic size

    def recording(gm, example_inputs):
        inputs = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        sizes = [d for v in inputs for d in ([v] if isinstance(v, torch.SymInt) else getattr(v, "shape", ()))]
        graphs.append(any(isinstance(d, torch.SymInt) for d in sizes))
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=recording, **kwargs))
    torch._dynamo.reset()
    main(demo_cfg(tmp_path, "MODEL.name", "tiny", "TRAIN.compile", "true", "TRAIN.epochs", "1",
                  "DATASET.test_batch_size", "300"))
    torch._dynamo.reset()
    assert len(graphs) >= 2 and not any(graphs)  # training's graph and evaluation's, both of one batch size


def test_a_resumed_compiled_run_compiles_what_a_fresh_run_compiles(tmp_path, monkeypatch):
    """One graph set for training and one for evaluation, and nothing more after a mid-epoch resume."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    common = ["MODEL.name", "tiny", "TRAIN.compile", "true", "TRAIN.resume", "auto", "TRAIN.ckpt_every_steps", "3",
              "DATASET.test_batch_size", "300"]
    torch._dynamo.reset()
    counters.clear()
    main(demo_cfg(tmp_path / "fresh", *common))
    fresh = counters["stats"]["unique_graphs"]
    cfg = demo_cfg(tmp_path / "resumed", *common)
    run_until(monkeypatch, cfg, lambda name, state: state["epoch"] == 0 and state["progress"]["step"] == 3)
    torch._dynamo.reset()
    counters.clear()
    main(cfg)
    assert 2 <= counters["stats"]["unique_graphs"] == fresh  # train and eval graphs, no recompile


def test_what_a_checkpoint_write_cut_short_left_is_removed_when_the_run_starts(tmp_path):
    cfg = demo_cfg(tmp_path, "TRAIN.epochs", "1", "MODEL.name", "tiny")
    os.makedirs(run_dir(cfg))
    orphan = os.path.join(run_dir(cfg), "last.pt.tmp.4242")
    open(orphan, "wb").write(b"half a checkpoint")
    main(cfg)
    assert not os.path.exists(orphan)
    assert "removed last.pt.tmp.4242" in open(os.path.join(run_dir(cfg), "log.txt")).read()


def test_a_checkpoint_round_trips_through_the_trainer(tmp_path):
    """state_dict and load_state_dict are one definition: what a checkpoint holds comes back unchanged."""
    from bsdist.distributed import init_distributed, shutdown
    from bsdist.output import NullOutput
    from bsdist.rundir import Start
    from bsdist.train import StopSignals
    from bsdist.trainer import Trainer
    cfg = demo_cfg(tmp_path, "MODEL.name", "tiny", "TRAIN.epochs", "1", "OPTIMIZER.momentum", "0.9",
                   "TRAIN.mixed_precision", "fp16")  # a gradient scaler with a state of its own
    main(cfg)
    saved = checkpoint.load(os.path.join(run_dir(cfg), "last.pt"))
    env = init_distributed("cpu", 60)
    try:
        trainer = Trainer(cfg, env, NullOutput(), Start(resume_from="last.pt"), StopSignals())
        trainer.load_state_dict(saved)
        again = trainer.state_dict()
    finally:
        shutdown()
    assert set(again) == set(saved)

    def same(a, b, where):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
        elif isinstance(a, dict):
            assert set(a) == set(b), where
            for k in a:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b, where
    for key in set(saved) - {"seconds"}:
        same(again[key], saved[key], key)
    assert again["seconds"] >= saved["seconds"] and saved["scaler"]["scale"] > 0
