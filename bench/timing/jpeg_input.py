"""JPEG input timings on generated ImageNet-like files: bsdist's worker path, the ImageFolder + PIL reference,
and DATASET.loader device's decoding on the training device (bench/jpeg.py and gpu_check's jpeg_input)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from timing.data_path import sync


def make_images(root: str, count: int, classes: int = 8) -> list[str]:
    from PIL import Image
    rng = np.random.RandomState(0)
    paths = []
    for i in range(count):
        low = rng.randint(0, 256, size=(12, 16, 3)).astype(np.uint8)  # smooth: upsampled coarse noise and a gradient
        image = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        folder = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"{i:05d}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def time_bsdist(root: str, paths: list[str], size: int) -> float:
    from bsdist.data.imagefiles import ImageFiles
    files = ImageFiles(root, [os.path.relpath(p, root) for p in paths], np.zeros(len(paths)), size, True, seed=0)
    files.__getitems__(list(range(8)))  # warm-up
    started = time.perf_counter()
    for start in range(0, len(paths), 64):
        files.__getitems__(list(range(start, min(start + 64, len(paths)))))
    return len(paths) / (time.perf_counter() - started)


def time_reference(root: str, size: int) -> float:
    import torchvision
    from torchvision import transforms
    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=0)
    for _ in zip(range(1), loader):  # warm-up
        pass
    started = time.perf_counter()
    for _ in loader:
        pass
    return len(dataset) / (time.perf_counter() - started)


def time_device_decode(root: str, paths: list[str], size: int, device: torch.device) -> float:
    """bsdist's DATASET.loader device path after the workers: a batch's bytes decoded and cropped on `device`
    (ImageFiles.decode_batch), 64 images a batch, the bytes read beforehand as the workers would."""
    from bsdist.data.imagefiles import ImageFiles
    files = ImageFiles(root, [os.path.relpath(p, root) for p in paths], np.zeros(len(paths)), size, True, seed=0,
                       encoded=True)
    batches = [files.__getitems__(list(range(start, min(start + 64, len(paths)))))
               for start in range(0, len(paths), 64)]
    files.decode_batch(batches[0][0], batches[0][2], device)  # warm-up
    sync(device)
    started = time.perf_counter()
    for packed, _, keys in batches:
        files.decode_batch(packed, keys, device)
    sync(device)
    return len(paths) / (time.perf_counter() - started)
