"""The DATASET section: which images, their long-tail profile, batches, sampler and augmentations."""

from __future__ import annotations

from dataclasses import dataclass

from bsdist.config.fields import at_least_one, non_negative, option, positive
from bsdist.config.names import ARRAY_DATASET_NAMES, AUGMENTATION_NAMES, FILE_DATASET_NAMES


@dataclass(frozen=True)
class Dataset:
    name: str = option("CIFAR10LT", "dataset: CIFAR-LT and the offline digits held in memory; ImageList (split lists "
                                    "or a class-per-folder tree) and its presets ImageNetLT, PlacesLT, iNat2018 read "
                                    "image files", choices=(*ARRAY_DATASET_NAMES, *FILE_DATASET_NAMES))
    datadir: str = option("./data", "directory holding cifar-10-batches-py/ or cifar-100-python/, or the images (and "
                                    "split lists) of an image-list dataset", resumable=True)
    train_list: str | None = option(None, "image-list datasets: the training list (`relative/path label` lines; "
                                          "relative to datadir, or absolute); null takes the preset's, or "
                                          "train/<class>/ folders", kind="str")
    val_list: str | None = option(None, "image-list datasets: the validation list; null takes the preset's, or "
                                        "val/<class>/ folders where they exist", kind="str")
    test_list: str | None = option(None, "image-list datasets: the test list; null takes the preset's, or "
                                         "test/<class>/ folders", kind="str")
    image_size: int = option(224, "image-list datasets: side of the square training and evaluation images "
                                  "(evaluation resizes the shorter side to image_size * 256 / 224 and crops the "
                                  "centre)", check=positive)
    max_image_pixels: int = option(89_478_485, "image-list datasets: the most pixels an image's header may claim "
                                               "(PIL's limit); a larger one stops the run before it is decoded. "
                                               "JPEG files above 4096 x 4096 are decoded reduced in the DCT (1/2, "
                                               "1/4 or 1/8) to the smallest size that covers their crop",
                                   check=positive, resumable=True)  # a run that stopped at a large image resumes
    download: bool = option(False, "download CIFAR (md5-checked) into datadir when missing", resumable=True)
    batch_size: int = option(32, "global images per step, split evenly across processes", check=positive)
    test_batch_size: int = option(1024, "images per evaluation batch on each process", check=positive, resumable=True)
    loader: str = option("auto", "device: batches are made on the training device (CIFAR and digits: the uint8 "
                                 "dataset lives there; image files: DataLoader workers read the bytes, the device "
                                 "decodes the JPEGs, nvJPEG on CUDA); dataloader: DataLoader workers decode and feed "
                                 "batches from host memory; auto: device when an in-memory dataset fits, dataloader "
                                 "for image files", choices=("auto", "device", "dataloader"), resumable=True)
    sampler: str = option("instance", "training order: instance draws every image once per epoch "
                                      "(DistributedSampler); class_balanced draws classes equally often (each image "
                                      "of a class equally likely), the epoch keeping its number of images: cRT's "
                                      "sampler", choices=("instance", "class_balanced"))
    num_workers: int = option(2, "DataLoader worker processes per training process (loader dataloader, and image "
                                 "files)", check=non_negative, resumable=True)
    imbalance_type: str | None = option("auto", "long-tail profile drawn from the training images; null keeps them "
                                                "all (a balanced set stays balanced, a list as it is); auto is exp "
                                                "for CIFAR and digits and null for image lists",
                                        choices=("auto", "exp", "step"), nullable=True)
    split_seed: int = option(0, "seed of the long-tailed subset and the validation hold-out; 0 is the standard "
                                "subset of LDAM-DRW and the reference trainer", check=non_negative)
    imbalance_factor: float = option(100.0, "largest / smallest class count (1 = balanced)", check=at_least_one)
    val_per_cls: int = option(0, "balanced validation images per class, taken from training images the long-tailed "
                                 "subset left unused; 0 selects the best model on the test set", check=non_negative)
    aug_info: tuple[str, ...] = option(["RandomCrop", "RandomHorizontalFlip"], "training augmentations, applied per "
                                       "batch on the device (RandomResizedCrop: as image files are decoded)",
                                       choices=AUGMENTATION_NAMES)
    crop_padding: int = option(4, "zero padding of RandomCrop, in pixels", check=non_negative)
