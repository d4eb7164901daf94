"""MODEL.classifier cosine: NormedLinear against kaidic/LDAM-DRW's, in place of a model's fc."""

import pytest
import torch
import torch.nn.functional as F

from bsdist import config
from bsdist.errors import BsdistError
from bsdist.models import classifier, create
from bsdist.models.heads import NormedLinear


def ldam_drw_normed_linear(x, weight):
    """kaidic/LDAM-DRW models/resnet_cifar.py lines 44-46, its weight being (in_features, out_features)."""
    return F.normalize(x, dim=1).mm(F.normalize(weight, dim=0))


def test_the_cosine_classifier_has_the_reference_implementation_s_values_and_gradients():
    torch.manual_seed(0)
    head = NormedLinear(64, 10)
    features = 5 * torch.randn(8, 64)
    weight = head.weight.detach().double().T.clone().requires_grad_()
    ours, reference = head(features), ldam_drw_normed_linear(features.double(), weight)
    assert torch.allclose(ours.double(), reference, atol=1e-6)
    assert ours.abs().max() <= 1 + 1e-6  # cosines
    ours.square().sum().backward()
    reference.square().sum().backward()
    assert torch.allclose(head.weight.grad.double().T, weight.grad, atol=1e-5)


def test_the_cosine_classifier_starts_with_unit_class_weights_as_the_source_s_renorm_leaves_them():
    torch.manual_seed(0)
    weight = NormedLinear(64, 10).weight
    assert torch.allclose(weight.norm(dim=1), torch.ones(10)) and weight.abs().max() < 1


def test_the_cosine_classifier_computes_in_fp32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert NormedLinear(16, 4)(torch.randn(2, 16).bfloat16()).dtype == torch.float32


def test_model_classifier_cosine_puts_it_in_resnet32_s_fc_and_methods_needing_a_linear_one_say_so():
    cfg = config.validate(config.load(None, ["MODEL.name", "resnet32", "MODEL.classifier", "cosine",
                                             "TRAIN.device", "cpu"]))
    model = create(cfg, 10, 3, torch.device("cpu"), sync_bn=False)
    assert isinstance(model.fc, NormedLinear) and "fc.bias" not in model.state_dict()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(BsdistError, match="has no linear classifier named fc"):
        classifier(model)  # cRT and post-hoc methods adjust a linear classifier
