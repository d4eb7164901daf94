"""The device-resident loader and the DataLoader path produce the same batches."""

import os

import pytest
import torch

import tiny_model
from bsdist import checkpoint, config
from bsdist.data import DeviceLoader, build_data
from bsdist.distributed import DistEnv, init_distributed, shutdown
from bsdist.evaluation import evaluate
from bsdist.runtime import Runtime
from bsdist.train import main

tiny_model.register()


@pytest.fixture(autouse=True)
def group():
    """A real world-size-1 process group: build_data and evaluate run their collectives in it."""
    env = init_distributed("cpu", 60)
    yield env
    shutdown()


CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def cifar_cfg(root, savedir, *overrides):
    return config.validate(config.load(None, [
        "DATASET.name", "CIFAR10LT", "DATASET.datadir", root, "DEFAULT.savedir", str(savedir),
        "DATASET.imbalance_factor", "2", "DATASET.batch_size", "16", "DATASET.test_batch_size", "24",
        "DATASET.num_workers", "0", "TRAIN.device", "cpu", "TRAIN.mixed_precision", "no", "TRAIN.compile", "false",
        "MODEL.name", "tiny", "TRAIN.epochs", "2", *overrides]))


def batches(loader, epoch, sampler=None):
    if sampler is not None:
        sampler.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_the_loader_setting_chooses_where_batches_are_gathered(cifar10_root, tmp_path, monkeypatch):
    import bsdist.data.build
    from torch.utils.data import DataLoader
    data = build_data(cifar_cfg(cifar10_root, tmp_path), CPU)  # auto, and the arrays fit
    assert isinstance(data.train, DeviceLoader) and all(isinstance(l, DeviceLoader) for l in data.eval.values())
    data = build_data(cifar_cfg(cifar10_root, tmp_path, "DATASET.loader", "dataloader"), CPU)
    assert isinstance(data.train, DataLoader) and all(isinstance(l, DataLoader) for l in data.eval.values())
    monkeypatch.setattr(bsdist.data.build, "fits_on_device", lambda datasets, device: False)  # a GPU without room
    assert isinstance(build_data(cifar_cfg(cifar10_root, tmp_path), CPU).train, DataLoader)
    assert isinstance(build_data(cifar_cfg(cifar10_root, tmp_path, "DATASET.loader", "device"), CPU).train,
                      DeviceLoader)


def test_training_seeds_share_the_long_tailed_subset_that_the_split_seed_draws(cifar10_root, tmp_path):
    def subset(*overrides):
        train = build_data(cifar_cfg(cifar10_root, tmp_path, "DATASET.val_per_cls", "2", *overrides), CPU).train.dataset
        return train.data.tobytes()
    standard = subset()
    assert subset("DEFAULT.seed", "7") == standard  # another training seed, the same images
    assert subset("DATASET.split_seed", "7") != standard  # another split


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2), (2, 3)])
def test_device_loader_yields_the_dataloader_batches(cifar10_root, tmp_path, rank, world_size):
    # the sampler takes rank and world size from env; the collectives run in the 1-process group
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    batch = ["DATASET.batch_size", str(6 * world_size)]
    device = build_data(cifar_cfg(cifar10_root, tmp_path, "DATASET.loader", "device", *batch), env)
    host = build_data(cifar_cfg(cifar10_root, tmp_path, "DATASET.loader", "dataloader", *batch), env)
    assert not isinstance(host.train, DeviceLoader)
    for epoch in (0, 1):
        a, b = batches(device.train, epoch, device.train_sampler), batches(host.train, epoch, host.train_sampler)
        assert len(a) == len(b) == len(device.train) == len(host.train) > 0
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                assert torch.equal(u, v)
    a, b = batches(device.eval["test"], 0), batches(host.eval["test"], 0)
    assert len(a) == len(b) and all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))


def test_both_loaders_train_to_the_same_weights(cifar10_root, tmp_path, group):
    shutdown()  # main joins its own group
    weights = {}
    for loader in ("device", "dataloader"):
        cfg = cifar_cfg(cifar10_root, tmp_path / loader, "DATASET.loader", loader, "OPTIMIZER.momentum", "0.9")
        main(cfg)
        weights[loader] = checkpoint.load(os.path.join(config.run_dir(cfg), "last.pt"))["model"]
    for key in weights["device"]:
        assert torch.equal(weights["device"][key], weights["dataloader"][key]), key


def test_padding_the_last_evaluation_batch_changes_nothing(cifar10_root, tmp_path):
    data = build_data(cifar_cfg(cifar10_root, tmp_path), CPU)
    torch.manual_seed(0)
    model = tiny_model.tiny(10, 3)
    args = (model, data.eval["test"], data.augment.normalize, 10, list(data.num_per_cls.values()))
    runtime = Runtime(torch.device("cpu"), 1, "no", False, False, "", "gloo", "")
    plain = evaluate(*args, runtime)
    batch_size = data.eval["test"].batch_sampler.batch_size
    padded = evaluate(*args, runtime, fixed_batch=batch_size)
    assert 103 % batch_size != 0  # the last batch really is short
    assert padded["confusion"] == plain["confusion"] and padded["num_images"] == 103
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-6)
