"""The MODEL section: network, stem, initialisation, classifier head, BatchNorm synchronisation."""

from __future__ import annotations

from dataclasses import dataclass

from bsdist.config.fields import option, positive
from bsdist.config.names import HEAD_NAMES, MODEL_NAMES


@dataclass(frozen=True)
class Model:
    name: str = option("resnet18", "model: resnet32 is the CIFAR ResNet of LDAM-DRW and BALMS, the others are "
                                   "torchvision's with MODEL.stem (see bsdist.models.zoo)",
                       choices=MODEL_NAMES)
    stem: str = option("auto", "first layers: cifar (3x3 stride-1 convolution, no max-pool) or imagenet (7x7 stride-2 "
                               "and max-pool); auto is cifar up to 64 px images (CIFAR, digits, image lists at "
                               "DATASET.image_size <= 64) and imagenet above", choices=("auto", "cifar", "imagenet"))
    pretrained: str | None = option(None, "a local weights file (a state dict, or a checkpoint holding one) to start "
                                          "from, read with weights_only; the classifier starts afresh when its class "
                                          "count differs; nothing is downloaded", kind="str")
    classifier: str = option("linear", "the classifier fc: linear, or cosine (NormedLinear of LDAM-DRW: the cosine "
                                       "of the normalised features and class weights, no bias; what LDAMLoss trains "
                                       "on in its source); post-hoc methods and cRT need linear",
                             choices=("linear", *HEAD_NAMES))
    sync_bn: bool | str = option("auto", "BatchNorm statistics over the global batch (all processes' images), as one "
                                         "process with the same batch computes them; auto: when several processes "
                                         "each hold fewer than MODEL.sync_bn_batch images", kind="auto_bool")
    sync_bn_batch: int = option(32, "with MODEL.sync_bn auto, the per-process batch below which BatchNorm "
                                    "synchronises", check=positive)
