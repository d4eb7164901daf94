"""Every model's classifier is its `fc` (CLASSIFIER): what decoupled training re-trains, with the rest of
the model frozen (freeze_backbone), and what post-hoc methods adjust."""

from __future__ import annotations

from torch import nn

from bsdist.errors import BsdistError


CLASSIFIER = "fc"


def classifier(model: nn.Module) -> nn.Linear:
    """The model's classifier (its `fc`), or one error for a model without one."""
    head = getattr(model, CLASSIFIER, None)
    if not isinstance(head, nn.Linear):
        raise BsdistError(f"{type(model).__name__} has no linear classifier named {CLASSIFIER}, which decoupled "
                          "training and post-hoc methods adjust; use a model of bsdist.models.MODELS such as resnet18")
    return head


def freeze_backbone(model: nn.Module, backbone: dict | None) -> nn.Module:
    """Stage 2 of decoupled training: everything but the classifier frozen, BatchNorm included.

    `backbone` (stage 1's state dict) is loaded into all but the classifier, which keeps its fresh
    initialisation; None builds the frozen structure for a checkpoint of the stage-2 run itself.
    Every BatchNorm becomes torchvision's FrozenBatchNorm2d, a fixed affine map from its running
    statistics whether or not the model is in training mode, and no backbone parameter takes gradients.
    """
    from torchvision.ops import FrozenBatchNorm2d
    classifier(model)
    if backbone is not None:
        own = model.state_dict()
        wrong = [k for k in own if not k.startswith(CLASSIFIER + ".")
                 and (k not in backbone or backbone[k].shape != own[k].shape)]
        wrong += [k for k in backbone if k not in own]
        if wrong:
            raise BsdistError(f"the stage-1 checkpoint does not fit this model ({len(wrong)} keys such as {wrong[0]}); "
                              "CRT.stage1 must name a run of the same MODEL.name and MODEL.stem")
        model.load_state_dict({k: v for k, v in backbone.items() if not k.startswith(CLASSIFIER + ".")}, strict=False)

    def frozen(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                fixed = FrozenBatchNorm2d(child.num_features, child.eps).to(child.weight.device)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(fixed, key).copy_(getattr(child, key).detach())
                setattr(module, name, fixed)
            else:
                frozen(child)
    frozen(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(CLASSIFIER + "."))
    return model
