"""Distributed behaviour on CPU with gloo: exact evaluation, and world-size-invariant training."""

import os

import pytest
import torch

from bsdist import checkpoint, config
from spawn import run_ranks


def make_cfg(root, savedir, *overrides):
    return config.load(None, ["DATASET.name", "CIFAR10LT", "DATASET.datadir", root, "DEFAULT.savedir", str(savedir),
                              "DATASET.imbalance_factor", "1", "DATASET.imbalance_type", "null",
                              "DATASET.num_workers", "0", "TRAIN.mixed_precision", "no", "TRAIN.device", "cpu",
                              "TRAIN.compile", "false", "MODEL.name", "tiny", *overrides])


def _eval_worker(raw_cfg):
    import torch.distributed as dist

    import tiny_model
    from bsdist.data import build_data
    from bsdist.distributed import init_distributed, world_size_from_env
    from bsdist.evaluation import evaluate
    from bsdist.runtime import resolve_runtime
    tiny_model.register()
    cfg = config.validate(raw_cfg, world_size_from_env())
    env = init_distributed("cpu", 60)
    try:
        data = build_data(cfg, env)
        torch.manual_seed(0)
        model = tiny_model.tiny(10, 3)
        shard = sum(len(targets) for _, targets, _ in data.eval["test"])  # images this rank evaluates
        metrics = evaluate(model, data.eval["test"], data.augment.normalize, 10, list(data.num_per_cls.values()),
                           resolve_runtime(cfg, env))
        return shard, metrics
    finally:
        dist.destroy_process_group()


def test_evaluation_counts_every_test_image_once_whatever_the_world_size(cifar10_root, tmp_path):
    raw = make_cfg(cifar10_root, tmp_path, "DATASET.test_batch_size", "8", "DATASET.batch_size", "48")
    single, errors = run_ranks(_eval_worker, 1, raw)
    assert not errors
    reference = single[0][1]
    assert reference["num_images"] == 103
    for world_size in (2, 3):
        results, errors = run_ranks(_eval_worker, world_size, raw)
        assert not errors, errors
        shards = [shard for shard, _ in results]
        assert sum(shards) == 103 and max(shards) - min(shards) <= 1  # no padding, no duplicates
        for _, metrics in results:  # the all-reduced confusion is the single-process one, on every rank
            assert metrics["confusion"] == reference["confusion"]
            assert metrics["num_images"] == 103
            assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)


def _train_worker(raw_cfg):
    import tiny_model
    from bsdist.distributed import world_size_from_env
    from bsdist.train import main
    from torch._dynamo.utils import counters
    tiny_model.register()
    results = main(config.validate(raw_cfg, world_size_from_env()))
    return results, counters["aot_autograd"]["total"]  # graphs compiled


def final_weights(savedir):
    runs = [os.path.join(dp, "last.pt") for dp, _, files in os.walk(savedir) if "last.pt" in files]
    assert len(runs) == 1
    return checkpoint.load(runs[0])["model"]


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one_process_with_the_same_global_batch(cifar10_root, tmp_path):
    # three DDP buckets; compiled, dynamo splits the graph at them (DDPOptimizer), with DDP's static graph on
    recipe = ["DATASET.batch_size", "32", "TRAIN.epochs", "2", "OPTIMIZER.momentum", "0.9",
              "OPTIMIZER.weight_decay", "0.0005", "SCHEDULER.params.warmup_epochs", "1", "MODEL.name", "wide",
              "TRAIN.ddp_bucket_mb", "1"]
    accumulate = ["DATASET.batch_size", "16", "TRAIN.grad_accum_steps", "2"]
    runs = {"one": (1, []), "two": (2, []), "accumulated": (1, accumulate),
            "two accumulated": (2, accumulate),  # no_sync at world size 2: DDP's static graph must be off there
            "two compiled": (2, ["TRAIN.compile", "true"])}
    weights, results = {}, {}
    for name, (world_size, extra) in runs.items():
        out, errors = run_ranks(_train_worker, world_size, make_cfg(cifar10_root, tmp_path / name, *recipe, *extra))
        assert not errors, errors
        weights[name], (results[name], graphs) = final_weights(tmp_path / name), out[0]
        # split at the buckets; nothing compiled where eager
        assert graphs > 1 if name == "two compiled" else graphs == 0
    initial = initial_weights()
    assert any(not torch.equal(initial[k], weights["one"][k]) for k in initial)  # training moved the weights
    for name in ("two", "accumulated", "two accumulated", "two compiled"):
        for key, value in weights["one"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: {key}: {m}")
        assert results[name]["last"]["acc"] == results["one"]["last"]["acc"]


def initial_weights():
    import tiny_model
    torch.manual_seed(0)
    return tiny_model.wide(10, 3).state_dict()


@pytest.mark.slow
def test_two_processes_with_synchronised_batchnorm_end_with_the_weights_of_one(cifar10_root, tmp_path):
    recipe = ["DATASET.batch_size", "32", "TRAIN.epochs", "2", "OPTIMIZER.momentum", "0.9", "MODEL.name", "tiny_bn",
              "SCHEDULER.params.warmup_epochs", "0"]
    runs = {"one": (1, []), "two synchronised": (2, ["MODEL.sync_bn", "auto", "MODEL.sync_bn_batch", "32"]),
            "two per process": (2, ["MODEL.sync_bn", "false"])}
    weights = {}
    for name, (world_size, extra) in runs.items():
        _, errors = run_ranks(_train_worker, world_size, make_cfg(cifar10_root, tmp_path / name, *recipe, *extra))
        assert not errors, errors
        weights[name] = final_weights(tmp_path / name)
    for key, value in weights["one"].items():  # parameters and running statistics alike
        torch.testing.assert_close(weights["two synchronised"][key].double(), value.double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")
    assert not torch.allclose(weights["two per process"]["1.running_mean"], weights["one"]["1.running_mean"], atol=1e-5)


def _turns_worker(fail_rank):
    import time

    from bsdist.distributed import init_distributed, main_process_first, shutdown
    rank = int(os.environ["RANK"])
    os.environ["LOCAL_RANK"] = str(rank % 2)  # two nodes of two processes: ranks 0, 1 and 2, 3
    env = init_distributed("cpu", 60)
    try:
        with main_process_first(env):
            started = time.time()
            time.sleep(0.3)
            if rank == fail_rank:
                raise RuntimeError(f"rank {rank} could not write the files")
            return started, time.time()
    finally:
        shutdown()


def test_files_are_prepared_by_rank_0_then_one_process_per_node_then_the_rest():
    (a0, z0), (a1, z1), (a2, z2), (a3, z3) = run_ranks(_turns_worker, 4, None)[0]
    assert z0 <= a2 and z2 <= min(a1, a3)  # rank 0, then the other node's first, then both nodes' second
    results, errors = run_ranks(_turns_worker, 4, 2)
    assert "rank 2 could not write the files" in errors[2] and not any(results)
    # the others stop with its reason, so torchrun's summary gives it whichever rank it names
    said = "BsdistError: rank 2 failed while preparing the run: RuntimeError: rank 2 could not write the files"
    assert all(errors[r].startswith(said) for r in (0, 1, 3)), errors


def _precision_worker(per_rank):
    import bsdist.config
    from bsdist.distributed import init_distributed, shutdown
    from bsdist.runtime import agreed_precision
    rank = int(os.environ["RANK"])
    bsdist.config.resolve_precision = lambda name, device: per_rank[rank] if name == "auto" else name
    env = init_distributed("cpu", 60)
    try:
        return agreed_precision("auto", env), agreed_precision("fp16", env)
    finally:
        shutdown()


def test_ranks_whose_gpus_resolve_mixed_precision_auto_differently_are_refused():
    assert run_ranks(_precision_worker, 2, ["bf16", "bf16"])[0] == [("bf16", "fp16")] * 2
    results, errors = run_ranks(_precision_worker, 2, ["bf16", "fp16"])
    assert len(errors) == 2 and all("chose bf16 on some ranks' GPUs and fp16 on others" in e for e in errors.values())


def test_two_ranks_on_one_gpu_are_refused_before_nccl_sees_them():
    from bsdist import BsdistError
    from bsdist.distributed import check_distinct_gpus
    # another node's GPU-a is another GPU
    check_distinct_gpus([("node1", "GPU-a"), ("node1", "GPU-b"), ("node2", "GPU-a")])
    with pytest.raises(BsdistError, match="ranks 0 and 2 share one GPU.*TRAIN.dist_backend gloo"):
        check_distinct_gpus([("node1", "GPU-a"), ("node1", "GPU-b"), ("node1", "GPU-a")])


@pytest.mark.slow
@pytest.mark.parametrize("loss", [
    ["LOSS.name", "LDAMLoss", "LOSS.drw_epoch", "0", "MODEL.classifier", "cosine", "TRAIN.epochs", "1"],
    ["LOSS.name", "ClassBalancedLoss", "LOSS.cb_loss_type", "focal", "LOSS.beta", "0.99"],
    ["LOSS.name", "FocalLoss", "LOSS.gamma", "2"],
], ids=["LDAMLoss-DRW", "ClassBalancedLoss-focal", "FocalLoss"])
def test_two_processes_train_the_long_tail_losses_to_the_weights_of_one(cifar10_root, tmp_path, loss):
    """The losses of issue 24 on a long-tailed set (20 to 2 images per class), DRW switching after epoch 1:
    every rank weights and margins by rank 0's counts, so 2 ranks end where 1 process does."""
    recipe = ["DATASET.batch_size", "32", "TRAIN.epochs", "2", "OPTIMIZER.momentum", "0.9", "MODEL.name", "tiny_fc",
              "MODEL.sync_bn", "true", "SCHEDULER.params.warmup_epochs", "0", "DATASET.imbalance_type", "exp",
              "DATASET.imbalance_factor", "10", *loss]
    weights = {}
    for world_size in (1, 2):
        _, errors = run_ranks(_train_worker, world_size, make_cfg(cifar10_root, tmp_path / str(world_size), *recipe))
        assert not errors, errors
        weights[world_size] = final_weights(tmp_path / str(world_size))
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[2][key].double(), value.double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")


def test_gloo_gets_the_interface_nccl_was_given():
    from bsdist.distributed import gloo_interface
    names = ["lo", "eno1", "eth0", "eth1", "ib0"]
    assert gloo_interface("eth", names) == "eth0"  # NCCL's prefix; gloo wants one exact name
    assert gloo_interface("ib0,eth", names) == "eth0"  # the first interface of this host that is selected
    assert gloo_interface("=eth1", names) == "eth1" and gloo_interface("=eth", names) is None
    assert gloo_interface("^docker,lo", names) is None and gloo_interface("", names) is None
    assert gloo_interface("bond", names) is None


def _lonely_worker():
    import time

    import bsdist.distributed as distributed
    from bsdist.errors import PeerFailure
    os.environ["WORLD_SIZE"] = "2"  # the other process never starts
    distributed.CONNECT_TIMEOUT_S = 2
    started = time.time()
    try:
        distributed.init_distributed("cpu", 1800)
    except PeerFailure as e:
        return str(e), time.time() - started


def test_a_group_that_cannot_form_fails_within_the_connect_timeout_naming_the_interface_settings():
    results, errors = run_ranks(_lonely_worker, 1)
    assert not errors, errors
    message, seconds = results[0]
    assert seconds < 30 and "the group of 2 processes did not form within 2 s" in message
    assert "NCCL_SOCKET_IFNAME" in message and "GLOO_SOCKET_IFNAME" in message
