"""JPEG training input per CPU core: bsdist's image-list path against torchvision's ImageFolder + PIL.

    python bench/jpeg.py [--images 400] [--rounds 3] [--out jpeg.json] [--device cuda]

Generates ImageNet-like JPEG files (500 x 375, quality 90, smooth content as photos have) in a class
folder tree, then times, in one process (one core: DataLoader workers multiply it), the training
transform of each path on the same files:
- bsdist: ImageFiles.__getitems__ (torchvision.io decode, libjpeg-turbo; RandomResizedCrop on uint8
  tensors to 224), handing over uint8 as training does (flip and normalisation then run on the device);
- reference: torchvision.datasets.ImageFolder with PIL decoding and RandomResizedCrop(224),
  RandomHorizontalFlip, ToTensor, Normalize, as the reference trainer and most LT codes do.
With --device cuda it also times torchvision.io.decode_jpeg on the GPU in batches plus the same crop,
the decoded + augmented images per second one GPU can take. Prints and writes one JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    from bsdist.data.imagelist import ImageFiles
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


def time_gpu_decode(paths: list[str], size: int) -> float:
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF
    data = [read_file(p) for p in paths]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(data), 64):
        images = decode_jpeg(data[start:start + 64], device="cuda")
        crops = [TF.resized_crop(im, 20, 30, 300, 400, [size, size], antialias=True) for im in images]
        torch.stack(crops)
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="timings of each path, interleaved; the best is kept")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default="jpeg.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the figure per core
    with tempfile.TemporaryDirectory() as root:
        paths = make_images(root, args.images)
        rates = {"bsdist": [], "reference": []}
        for _ in range(args.rounds):
            rates["bsdist"].append(time_bsdist(root, paths, args.size))
            rates["reference"].append(time_reference(root, args.size))
        report = {"images": args.images, "image_bytes_mean": int(np.mean([os.path.getsize(p) for p in paths])),
                  "bsdist_img_per_s_per_core": max(rates["bsdist"]),
                  "reference_img_per_s_per_core": max(rates["reference"]),
                  "rounds": rates, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                  "date": time.strftime("%Y-%m-%d")}
        report["ratio"] = report["bsdist_img_per_s_per_core"] / report["reference_img_per_s_per_core"]
        if args.device == "cuda":
            report["gpu"] = torch.cuda.get_device_name()
            report["gpu_decode_crop_img_per_s"] = max(time_gpu_decode(paths, args.size) for _ in range(args.rounds))
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
