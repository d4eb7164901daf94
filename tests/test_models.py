"""Model pieces: the fp32 classifier, bsdist's SyncBatchNorm against BatchNorm, no DDP for one process."""

import pytest
import torch
from torch import nn

from bsdist import config
from bsdist.distributed import init_distributed, shutdown
from bsdist.models import _GlobalBatchStats, build_model, convert_sync_batchnorm, resnet18


@pytest.fixture
def env():
    env = init_distributed("cpu", 60)
    yield env
    shutdown()


def test_the_classifier_computes_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = resnet18(100, 3).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
        features = torch.randn(2, 512).bfloat16()
        bf16_logits = nn.functional.linear(features, model.fc.weight.bfloat16())
    assert logits.dtype == torch.float32
    # bf16 ties, fp32 does not
    assert len(set(bf16_logits[0].tolist())) < 100 <= len(set(model.fc(features)[0].tolist()))
    assert {"fc.weight", "fc.bias"} <= set(model.state_dict())  # nn.Linear's keys: checkpoints load into plain models


def test_global_batch_statistics_equal_batchnorm_on_one_process(env):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(4).double()
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    ours = {k: v.clone() for k, v in bn.state_dict().items()}
    weight, bias = ours["weight"].requires_grad_(), ours["bias"].requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn_like(x)
    (bn(x1) * upstream).sum().backward()
    y = _GlobalBatchStats.apply(x2, weight, bias, ours["running_mean"], ours["running_var"], 0.1, 1e-5, 6 * 25)
    (y * upstream).sum().backward()
    torch.testing.assert_close(y.detach(), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, 1e-5))
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(weight.grad, bn.weight.grad)
    torch.testing.assert_close(bias.grad, bn.bias.grad)
    torch.testing.assert_close(ours["running_mean"], bn.running_mean)
    torch.testing.assert_close(ours["running_var"], bn.running_var)


def test_converting_to_sync_batchnorm_keeps_parameters_and_keys():
    model = resnet18(10, 3)
    state = model.state_dict()
    synced = convert_sync_batchnorm(model)
    assert sum(type(m).__name__ == "SyncBatchNorm" for m in synced.modules()) == 20
    assert all(torch.equal(state[k], v) for k, v in synced.state_dict().items())


def test_one_process_trains_without_ddp(env):
    cfg = config.validate(config.load(None, ["TRAIN.device", "cpu"]))
    model = build_model(cfg, num_classes=10, in_channels=3, device=env.device, compile_model=False)
    assert model.wrapped is model.module is model.compiled
    assert not isinstance(model.wrapped, nn.parallel.DistributedDataParallel)


@pytest.mark.parametrize("name, classes, parameters", [
    ("resnet32", 10, 464_154),  # LDAM-DRW / BALMS CIFAR-10: 0.46 M
    ("resnet18", 1000, 11_689_512),  # torchvision's published counts
    ("resnet50", 1000, 25_557_032),
    ("resnext50_32x4d", 1000, 25_028_904),
    ("resnet152", 1000, 60_192_808),
])
def test_the_literature_s_models_have_their_published_sizes(name, classes, parameters):
    from bsdist.models import MODELS
    model = MODELS[name](classes, 3, stem="cifar" if name == "resnet32" else "imagenet")
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_resnet10_is_one_basic_block_per_stage_and_the_stem_follows_the_image_size():
    from bsdist.models import MODELS, create
    net = MODELS["resnet10"](1000, 3, stem="imagenet")
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    def resolved(*overrides):
        return config.validate(config.load(None, ["MODEL.name", "resnet10", *overrides]))
    assert resolved().MODEL.stem == "cifar"  # CIFAR's 32 px
    assert resolved("DATASET.name", "ImageList", "DATASET.image_size", "32").MODEL.stem == "cifar"
    assert resolved("DATASET.name", "ImageList").MODEL.stem == "imagenet"  # 224 px
    assert resolved("DATASET.name", "ImageList", "MODEL.stem", "cifar").MODEL.stem == "cifar"  # forced
    small = create(resolved(), 10, 3, torch.device("cpu"), False)
    large = create(resolved("DATASET.name", "ImageList"), 10, 3, torch.device("cpu"), False)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    assert small(torch.zeros(2, 3, 32, 32)).shape == large(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    from bsdist import BsdistError
    with pytest.raises(BsdistError, match="resnet32 is the CIFAR ResNet"):
        create(config.validate(config.load(None, ["MODEL.name", "resnet32", "MODEL.stem", "imagenet"])), 10, 3,
               torch.device("cpu"), False)


def test_pretrained_weights_load_from_a_local_file_with_a_fresh_classifier_and_a_mismatch_is_one_line(tmp_path):
    from bsdist import BsdistError
    from bsdist.models import MODELS, create
    torch.manual_seed(0)
    imagenet = MODELS["resnet18"](1000, 3, stem="imagenet")
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, tmp_path / "in1k.pth")
    cfg = config.validate(config.load(None, ["MODEL.pretrained", str(tmp_path / "in1k.pth"), "MODEL.stem", "imagenet"]))
    places = create(cfg, 365, 3, torch.device("cpu"), False)
    assert torch.equal(places.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert places.fc.weight.shape == (365, 512)
    with pytest.raises(BsdistError, match=r"does not fit ResNet with MODEL.stem as set: keys conv1.weight has shape "
                                          r"\(64, 3, 7, 7\), the model \(64, 3, 3, 3\)"):
        create(config.validate(config.load(None, ["MODEL.pretrained", str(tmp_path / "in1k.pth")])), 365, 3,
               torch.device("cpu"), False)
    with pytest.raises(BsdistError,
                       match="MODEL.pretrained .*nothing.pth does not exist; give the path of a local weights file"):
        create(config.validate(config.load(None, ["MODEL.pretrained", str(tmp_path / "nothing.pth")])), 10, 3,
               torch.device("cpu"), False)


def _syncbn_worker(x):
    from bsdist.models import _GlobalBatchStats
    env = init_distributed("cpu", 60)
    try:
        shard = x.chunk(2)[env.rank]
        running_mean, running_var = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        y = _GlobalBatchStats.apply(shard, torch.ones(x.shape[1]), torch.zeros(x.shape[1]), running_mean, running_var,
                                    1.0, 1e-5, x.numel() // x.shape[1])
        return y.numpy(), running_var.numpy()  # numpy: tensors would be shared with a process about to end
    finally:
        shutdown()


def test_synchronised_statistics_keep_their_precision_when_the_mean_dwarfs_the_spread():
    from spawn import run_ranks
    torch.manual_seed(0)
    x = (1e4 + 0.1 * torch.randn(8, 3, 4, 4, dtype=torch.float64))
    x[4:] += 0.05  # the two ranks' means differ a little too
    results, errors = run_ranks(_syncbn_worker, 2, x.float())
    assert not errors, errors
    var = x.float().double().var(dim=(0, 2, 3), unbiased=False)  # the reference: the fp32 input in float64
    xhat = (x.float().double() - x.float().double().mean(dim=(0, 2, 3), keepdim=True)) / (var.view(1, -1, 1, 1)
                                                                                          + 1e-5).sqrt()
    for rank, (y, running_var) in enumerate(results):
        # within 1%: the ranks' fp32 means themselves are only known to 1e4's fp32 spacing (1e-3)
        torch.testing.assert_close(torch.from_numpy(running_var).double(), var * 128 / 127, rtol=1e-2, atol=0)
        torch.testing.assert_close(torch.from_numpy(y).double(), xhat.chunk(2)[rank], rtol=1e-2, atol=1e-2)
    xf = x.float()  # what E[x^2] - E[x]^2 in fp32 gives: not even the right order of magnitude
    naive = (xf * xf).mean(dim=(0, 2, 3)) - xf.mean(dim=(0, 2, 3)) ** 2
    assert not torch.allclose(naive.double(), var, rtol=1.0)
