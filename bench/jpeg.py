"""JPEG training input per CPU core: bsdist's image-list path against torchvision's ImageFolder + PIL.

    python bench/jpeg.py [--images 400] [--rounds 3] [--out jpeg.json] [--device cuda]

Generates ImageNet-like JPEG files (500 x 375, quality 90, smooth content as photos have) in a class
folder tree, then times, in one process (one core: DataLoader workers multiply it), the training
transform of each path on the same files:
- bsdist: ImageFiles.__getitems__ (torchvision.io decode, libjpeg-turbo; RandomResizedCrop on uint8
  tensors to 224), handing over uint8 as training does (flip and normalisation then run on the device);
- reference: torchvision.datasets.ImageFolder with PIL decoding and RandomResizedCrop(224),
  RandomHorizontalFlip, ToTensor, Normalize, as the reference trainer and most LT codes do.
It also times DATASET.loader device's side of the training process, batches of file bytes decoded
(torchvision.io.decode_jpeg) and cropped on --device: with cuda, the decoded + augmented images per
second one GPU takes (nvJPEG); with cpu, the same code on one core. Prints and writes one JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

# timing first: it puts the repository root on sys.path
from timing.jpeg_input import make_images, time_bsdist, time_device_decode, time_reference


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
        device = torch.device(args.device)
        report["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (one core)"
        report["decode_on_device_img_per_s"] = max(time_device_decode(root, paths, args.size, device)
                                                   for _ in range(args.rounds))
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
