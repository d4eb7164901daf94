"""How a run builds and wraps its model: the architecture by name (zoo), pretrained weights, a frozen
backbone for decoupled stage 2 (classifier), SyncBatchNorm (syncbn), torch.compile, DDP (build)."""

from bsdist.models.build import Model, build_model, create, distribute, grads_in_buckets, no_sync
from bsdist.models.classifier import CLASSIFIER, classifier, freeze_backbone
from bsdist.models.syncbn import SyncBatchNorm, _GlobalBatchStats, convert_sync_batchnorm
from bsdist.models.zoo import MODELS, Float32Linear, resnet18

__all__ = ["CLASSIFIER", "MODELS", "Model", "Float32Linear", "SyncBatchNorm", "_GlobalBatchStats", "build_model",
           "classifier", "convert_sync_batchnorm", "create", "distribute", "freeze_backbone", "grads_in_buckets",
           "no_sync", "resnet18"]
