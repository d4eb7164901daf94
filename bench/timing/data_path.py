"""The images every benchmark trains on and the data path alone: the reference trainer's DataLoader with
per-image PIL transforms against bsdist's device loader and batch augmentation."""

from __future__ import annotations

import time

import numpy as np
import torch

from bsdist.data import Data, DeviceLoader, ResumableBatchSampler
from bsdist.data.augment import BatchAugment
from bsdist.data.datasets import CIFAR10LT, ImageArrays


def cifar_shaped_digits(n: int, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n of scikit-learn's 8 x 8 digits scaled to side x side x 3 (side a multiple of 8)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    images = np.repeat(np.kron(images, np.ones((side // 8, side // 8), np.uint8))[..., None], 3, axis=3)
    reps = -(-n // len(images))
    return np.tile(images, (reps, 1, 1, 1))[:n], np.tile(digits.target, reps)[:n].astype(np.int64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loader(data, targets, batch_size):
    """The reference trainer's input pipeline: torchvision PIL transforms, one image at a time."""
    from PIL import Image
    from torchvision import transforms
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize(CIFAR10LT.mean, CIFAR10LT.std)])

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(targets)

        def __getitem__(self, i):
            return tf(Image.fromarray(data[i])), int(targets[i])
    return torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)


def bsdist_data(data, targets, batch_size, device, seed=0, world_size=1, rank=0):
    """bsdist's training data with batch augmentation, batch_size per process, from the default device loader."""
    ds = ImageArrays(data, targets)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    augment = BatchAugment(len(ds), mean=CIFAR10LT.mean, std=CIFAR10LT.std,
                           aug_info=["RandomCrop", "RandomHorizontalFlip"], padding=4, seed=seed, device=device)
    batches = ResumableBatchSampler(sampler, batch_size, True)
    counts = {c: int((targets == c).sum()) for c in range(10)}
    return Data(train=DeviceLoader(ds, batches, device), train_sampler=sampler, eval={}, augment=augment,
                num_per_cls=counts, num_classes=10, in_channels=3)


def images_per_second(n_images, seconds):
    return n_images / seconds if seconds > 0 else float("nan")


def bench_data_path(batch_size, device, batches):
    data, targets = cifar_shaped_digits(batch_size * (batches + 1))
    ref = reference_loader(data, targets, batch_size)
    it = iter(ref)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        images = images.to(device)
    sync(device)
    ref_rate = images_per_second(batches * batch_size, time.perf_counter() - t0)

    ours = bsdist_data(data, targets, batch_size, device)
    ours.train_sampler.set_epoch(0)
    ours.augment.set_epoch(0)
    it = iter(ours.train)
    images, _, idx = next(it)
    ours.augment(images, idx)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _, idx = next(it)
        x = ours.augment(images, idx)
    sync(device)
    our_rate = images_per_second(batches * batch_size, time.perf_counter() - t0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    return ref_rate, our_rate
