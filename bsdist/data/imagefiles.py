"""Image files decoded, cropped and resized into uint8 batches: in DataLoader workers or on the training device.

DATASET.loader dataloader (and auto): each worker decodes its batch's files (libjpeg-turbo through
torchvision.io; grayscale, CMYK and PNG files become RGB), crops and resizes them and hands over uint8.
DATASET.loader device: the workers only read the files' bytes; the training process decodes each
batch's JPEG files in one torchvision.io.decode_jpeg call on its device (nvJPEG on CUDA) and crops
there. A file that is not a three- or one-channel JPEG (PNG, CMYK or YCCK JPEG) is decoded in the worker,
and a JPEG the device's decoder refuses on the CPU, so every file the first path reads the second reads
too, in the same colours.

Either way flipping, normalisation and channels_last happen on the training device (BatchAugment), and
the training crop is RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) drawn from (seed, epoch, image):
it depends neither on the world size nor on where the image was decoded. Evaluation resizes the shorter
side to image_size * 256 / 224 and crops the centre, the ImageNet convention. A missing or undecodable
file, or one whose header claims more than DATASET.max_image_pixels, stops the run with one line naming
it and pointing at `--check-data --decode`; the header is read before anything is decoded, in the worker
on both paths. A JPEG above REDUCE_ABOVE_PIXELS is decoded in the worker reduced in the DCT, by the
largest of 1/2, 1/4 and 1/8 that leaves its crop at least image_size pixels a side (bsdist.data.decoding).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from bsdist.data.decoding import (MAX_IMAGE_PIXELS, REDUCE_ABOVE_PIXELS, Header, decode_bytes, decoder_message,
                                  header_problem, read_header, reduction)
from bsdist.data import device_decoding
from bsdist.errors import BsdistError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHECK_DATA_HINT = "list every bad file with python launch.py CONFIG --check-data --decode"


def crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop of an h x w image (scale 0.08-1, ratio 3/4-4/3),
    torchvision's procedure: ten tries, then the largest centre crop of an allowed ratio."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < 3 / 4:
        cw, ch = w, min(h, int(round(w / (3 / 4))))
    elif ratio > 4 / 3:
        cw, ch = min(w, int(round(h * 4 / 3))), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def pack(items: list[torch.Tensor], sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JPEG bytes (1-D) and decoded images (3 x h x w) as one buffer, their lengths and rows (h, w, H, W): the
    decoded size ((0, 0) for JPEG bytes) and the size in the file, which the crop is drawn on. A worker hands a
    batch over in three tensors, not one shared-memory file per image."""
    shapes = torch.tensor([(*(item.shape[1:] if item.dim() == 3 else (0, 0)), *size)
                           for item, size in zip(items, sizes)], dtype=torch.int64)
    lengths = torch.tensor([item.numel() for item in items], dtype=torch.int64)
    return torch.cat([item.reshape(-1) for item in items]), lengths, shapes.reshape(-1, 4)


def unpack(data: torch.Tensor, lengths: torch.Tensor, shapes: torch.Tensor
           ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """The items `pack` joined, as views of its buffer, and their sizes in their files."""
    parts, rows = data.split(lengths.tolist()), shapes.tolist()
    images = [part if h == 0 else part.view(3, h, w) for part, (h, w, _, _) in zip(parts, rows)]
    return images, [(height, width) for *_, height, width in rows]


class HeaderRefused(ValueError):
    """A file whose header forbids decoding it: a size above DATASET.max_image_pixels, or a scan too short for it."""


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 (N x S x S x 3) batches, or with encoded=True as what the device decodes.

    `__getitems__` takes keys epoch * len(self) + index (KeyedSampler), so that a training crop depends
    on (seed, epoch, image) only; it returns (images, targets, dataset indices) like ImageArrays, or
    with encoded=True (packed items, targets, keys) for `decode_batch` (DecodeOnDevice). A file whose
    header claims more than max_pixels is refused before it is decoded.
    """

    in_channels = 3

    def __init__(self, root: str, paths: list[str], targets: np.ndarray, image_size: int, random_crop: bool, seed: int,
                 encoded: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
        self.root, self.paths, self.image_size, self.random_crop, self.seed = root, paths, image_size, random_crop, seed
        self.targets = np.asarray(targets, dtype=np.int64)
        self.encoded, self.max_pixels = encoded, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, keys):
        keys = torch.as_tensor(keys, dtype=torch.int64)
        indices = keys % len(self)
        targets = torch.from_numpy(self.targets[indices.numpy()])
        if self.encoded:
            items = [self.read_encoded(*divmod(key, len(self))[::-1]) for key in keys.tolist()]
            return pack(*zip(*items)), targets, keys
        size = self.image_size
        images = torch.empty(len(keys), 3, size, size, dtype=torch.uint8)
        for j, key in enumerate(keys.tolist()):
            epoch, i = divmod(key, len(self))
            images[j] = self.transform(*self.decode(i, epoch), epoch, i)
        # N x H x W x C as a view: the layout change costs a strided copy per image here, and nothing on the
        # device, where normalisation writes channels_last anyway
        return images.permute(0, 2, 3, 1), targets, indices

    def read(self, i: int) -> torch.Tensor:
        """The file's bytes (1-D uint8), or one error naming the file."""
        from torchvision.io import read_file
        try:
            return read_file(os.path.join(self.root, self.paths[i]))
        except Exception as e:
            raise self.error(i, e) from None

    def header(self, data: torch.Tensor) -> Header | None:
        """What the file's header claims (None for a format torchvision does not read); HeaderRefused when it
        forbids decoding the file."""
        header = read_header(memoryview(data.numpy()))
        problem = header_problem(header, data.numel(), self.max_pixels)
        if problem:
            raise HeaderRefused(problem + (" (raise it where images this large are legitimate)"
                                           if "max_image_pixels" in problem else ""))
        return header

    def decode(self, i: int, epoch: int = 0, data: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image (from its bytes when given) as uint8 RGB (3 x h x w) on the CPU, reduced in the DCT where its
        crop in `epoch` allows, and its size in the file; or one error naming the file."""
        data = self.read(i) if data is None else data
        try:
            return self.pixels(data, epoch, i)
        except Exception as e:
            raise self.error(i, e) from None

    def pixels(self, data: torch.Tensor, epoch: int, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """`decode` without the file's name: HeaderRefused, or the decoder's own error."""
        header = self.header(data)
        image = decode_bytes(data, self.reduction(header, epoch, i))
        return image, (header.height, header.width) if header else tuple(image.shape[1:])

    def reduction(self, header: Header | None, epoch: int, i: int) -> int:
        """By how much a JPEG above REDUCE_ABOVE_PIXELS may be decoded reduced: its crop keeps at least image_size
        pixels a side (training: the crop box of (seed, epoch, image); evaluation: the shorter side resized to
        image_size * 256 / 224), so the resize after it only shrinks, as it would after a full decode."""
        if header is None or header.frame is None or header.height * header.width <= REDUCE_ABOVE_PIXELS:
            return 1
        size = header.height, header.width
        if self.random_crop:
            _, _, height, width = self.crop(size, epoch, i)
            return reduction(height, width, self.image_size)
        return reduction(*size, round(self.image_size * 256 / 224))

    def crop(self, size: tuple[int, int], epoch: int, i: int) -> tuple[int, int, int, int]:
        """The training crop box of (seed, epoch, image) in the coordinates of the image's size in its file."""
        return crop_box(*size, np.random.default_rng([self.seed, epoch, i]))

    def error(self, i: int, error: Exception) -> BsdistError:
        path = os.path.join(self.root, self.paths[i])
        reason = ("it does not exist" if not os.path.exists(path) else str(error) if isinstance(error, HeaderRefused)
                  else f"it cannot be decoded ({decoder_message(error)})")
        return BsdistError(f"image {path}: {reason}; {CHECK_DATA_HINT}")

    def read_encoded(self, i: int, epoch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """A grey or colour JPEG file's bytes for the device to decode, once its header is checked; any other file
        decoded here (3 x h x w): nvJPEG as torchvision calls it has no CMYK conversion, which libjpeg-turbo
        here has, and no reduced decoding. With the image's size in its file."""
        data = self.read(i)
        try:
            header = self.header(data)
        except HeaderRefused as e:
            raise self.error(i, e) from None
        if header and header.components in (1, 3) and self.reduction(header, epoch, i) == 1:
            return data, (header.height, header.width)
        return self.decode(i, epoch, data)

    def decode_batch(self, packed: tuple, keys: torch.Tensor, device: torch.device) -> torch.Tensor:
        """An encoded batch (`__getitems__` with encoded=True) decoded and cropped on `device`: uint8 N x S x S x 3."""
        n, size = len(self), self.image_size
        (items, sizes), keys = unpack(*packed), keys.tolist()
        jpegs = [j for j, item in enumerate(items) if item.dim() == 1]
        decoded = dict(zip(jpegs, self.decode_jpegs([items[j] for j in jpegs], [keys[j] % n for j in jpegs], device)))
        images = torch.empty(len(items), 3, size, size, dtype=torch.uint8, device=device)
        for j, key in enumerate(keys):
            epoch, i = divmod(key, n)
            image = decoded[j] if j in decoded else items[j].to(device, non_blocking=True)
            images[j] = self.transform(image, sizes[j], epoch, i)
        return images.permute(0, 2, 3, 1)

    def decode_jpegs(self, data: list[torch.Tensor], indices: list[int], device: torch.device) -> list[torch.Tensor]:
        """JPEG bytes decoded on `device` in one call; when the decoder refuses the batch, one by one, and a
        file it refuses on the CPU, or one error naming the file. Running out of device memory is not a refusal."""
        if not data:
            return []
        try:
            return device_decoding.decode_jpegs_on(data, device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass  # which file, and whether the CPU can read it, is found below
        images = []
        for item, i in zip(data, indices):
            try:
                images += device_decoding.decode_jpegs_on([item], device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                images.append(self.decode(i, data=item)[0].to(device))
        return images

    def transform(self, image: torch.Tensor, size: tuple[int, int], epoch: int, i: int) -> torch.Tensor:
        """The training crop of (seed, epoch, image), or the evaluation centre crop, on the image's device. The
        crop box is drawn on the image's size in its file and, where it was decoded reduced, scaled to it."""
        from torchvision.transforms.v2 import functional as TF
        out = [self.image_size] * 2
        if self.random_crop:
            top, left, height, width = self.crop(size, epoch, i)
            if tuple(image.shape[1:]) != tuple(size):
                top, left, height, width = scaled_box((top, left, height, width), size, image.shape[1:])
            return TF.resized_crop(image, top, left, height, width, out, antialias=True)
        resized = TF.resize(image, round(self.image_size * 256 / 224), antialias=True)
        return TF.center_crop(resized, out)


def scaled_box(box: tuple[int, int, int, int], size: tuple[int, int], reduced: tuple[int, int]
               ) -> tuple[int, int, int, int]:
    """A crop box (top, left, height, width) of an image of `size` moved to the same image decoded at `reduced`
    (each side divided by 2, 4 or 8 and rounded up), rounded to whole pixels inside it."""
    (top, left, height, width), (fy, fx) = box, (reduced[0] / size[0], reduced[1] / size[1])
    top, left = min(round(top * fy), reduced[0] - 1), min(round(left * fx), reduced[1] - 1)
    height, width = min(round(height * fy), reduced[0] - top), min(round(width * fx), reduced[1] - left)
    return top, left, max(1, height), max(1, width)


class KeyedSampler(torch.utils.data.Sampler):
    """A sampler's indices as keys epoch * N + index for ImageFiles (its epoch read when iterated)."""

    def __init__(self, sampler, num_samples: int):
        self.sampler, self.num_samples = sampler, num_samples

    def __iter__(self):
        offset = getattr(self.sampler, "epoch", 0) * self.num_samples
        return (offset + i for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class DecodeOnDevice:
    """A DataLoader over encoded ImageFiles whose batches are decoded and cropped on the training device.

    Yields (uint8 images N x S x S x 3 on the device, int64 targets, int64 dataset indices) as the other
    loaders do; its batch_sampler is the DataLoader's, so a resumed epoch starts where the checkpoint left.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device):
        self.loader, self.dataset, self.device = loader, loader.dataset, device

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        n = len(self.dataset)
        for packed, targets, keys in self.loader:
            images = self.dataset.decode_batch(packed, keys, self.device)
            # the keys come pinned from the DataLoader: their copy does not wait, their remainder runs on the device
            yield images, targets, keys.to(self.device, non_blocking=True) % n
