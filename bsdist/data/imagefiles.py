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
file stops the run with one line naming it and pointing at `--check-data --decode`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings

import numpy as np
import torch

from bsdist.errors import BsdistError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHECK_DATA_HINT = "list every bad file with python launch.py CONFIG --check-data --decode"
JPEG_START = b"\xff\xd8"
LOG = logging.getLogger("bsdist")
# torchvision 0.29 announces that TorchCodec will take over its image decoding; until then it is the
# libjpeg-turbo decoder bsdist measured, and the notice would repeat in every DataLoader worker
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def jpeg_channels(data: bytes | memoryview) -> int | None:
    """The number of colour components in a JPEG file's frame header (1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK),
    or None when the bytes are not a JPEG or end before the frame header."""
    if data[:2] != JPEG_START:
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            return data[at + 9] if at + 9 < len(data) else None
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


def decode_bytes(data: torch.Tensor) -> torch.Tensor:
    """A file's bytes decoded on the CPU as uint8 RGB (3 x H x W): JPEG (libjpeg-turbo; grayscale and CMYK
    converted), PNG and the other formats torchvision reads."""
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(data, mode=ImageReadMode.RGB)


def read_image(path: str) -> torch.Tensor:
    from torchvision.io import read_file
    return decode_bytes(read_file(path))


def decoder_message(error: Exception) -> str:
    """The decoder's reason in its own words, without the C++ source location torchvision puts first."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\w+, \S+:\d+, ", "", text)[:100]


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


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def decode_jpegs_on(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG files' bytes (CPU) decoded as uint8 RGB on `device` in one torchvision.io.decode_jpeg call.

    On CUDA the call runs with a stream of its own current. torchvision 0.29's nvJPEG decoder allocates
    its outputs on the current stream but writes them from a pool stream that does not wait for that one
    (described in pytorch/vision pull request 9606), so with the training stream current it can be
    handed a block the training stream freed while its queued kernels still read it, and overwrite it. A
    stream of its own has freed only the decoder's earlier outputs, and record_stream holds each output
    back from reuse until the training stream's work on it is done; the training stream waits for the
    decode before it reads. Check 10 of bench/gpu_check.py shows both the overwrite and its absence here.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    training = torch.cuda.current_stream(device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    side = _DECODE_STREAMS[device]
    with torch.cuda.stream(side):
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    training.wait_stream(side)
    for image in images:
        image.record_stream(training)
    return images


_DECODER_WORKS: dict[torch.device, bool] = {}


def device_decoder_works(device: torch.device) -> bool:
    """Whether decode_jpeg decodes on `device` as libjpeg-turbo does on the CPU, tried once per device on a
    small JPEG made here: a broken nvJPEG (a driver or library mismatch) would otherwise refuse every batch,
    each file then decoded alone on the CPU of the training process. Says so in one line when it does not."""
    if device not in _DECODER_WORKS:
        from torchvision.io import encode_jpeg
        ramp = torch.arange(32, dtype=torch.uint8) * 8
        jpeg = encode_jpeg(torch.stack([ramp.expand(32, 32), ramp.expand(32, 32).T, 255 - ramp.expand(32, 32)]))
        try:
            decoded = decode_jpegs_on([jpeg], device)[0].cpu()
            expected = decode_bytes(jpeg)
            differ = decoded.shape != expected.shape or (decoded.float() - expected.float()).abs().mean() > 4
            reason = "its pixels are not the CPU decoder's" if differ else None
        except RuntimeError as e:  # nvJPEG's own errors, and CUDA's
            reason = decoder_message(e)
        if reason:
            LOG.warning(f"decoding JPEG files on {device} fails ({reason}): DataLoader workers decode them on the "
                        "CPU instead (as with DATASET.loader dataloader)")
        _DECODER_WORKS[device] = reason is None
    return _DECODER_WORKS[device]


def pack(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JPEG bytes (1-D) and decoded images (3 x H x W) as one buffer, their lengths and (H, W) (0, 0 for JPEG
    bytes): a worker hands a batch over in three tensors, not one shared-memory file per image."""
    shapes = torch.tensor([item.shape[1:] if item.dim() == 3 else (0, 0) for item in items], dtype=torch.int64)
    lengths = torch.tensor([item.numel() for item in items], dtype=torch.int64)
    return torch.cat([item.reshape(-1) for item in items]), lengths, shapes.reshape(-1, 2)


def unpack(data: torch.Tensor, lengths: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """The items `pack` joined, as views of its buffer."""
    parts = data.split(lengths.tolist())
    return [part if h == 0 else part.view(3, h, w) for part, (h, w) in zip(parts, shapes.tolist())]


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 (N x S x S x 3) batches, or with encoded=True as what the device decodes.

    `__getitems__` takes keys epoch * len(self) + index (KeyedSampler), so that a training crop depends
    on (seed, epoch, image) only; it returns (images, targets, dataset indices) like ImageArrays, or
    with encoded=True (packed items, targets, keys) for `decode_batch` (DecodeOnDevice).
    """

    in_channels = 3

    def __init__(self, root: str, paths: list[str], targets: np.ndarray, image_size: int, random_crop: bool, seed: int,
                 encoded: bool = False):
        self.root, self.paths, self.image_size, self.random_crop, self.seed = root, paths, image_size, random_crop, seed
        self.targets = np.asarray(targets, dtype=np.int64)
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, keys):
        keys = torch.as_tensor(keys, dtype=torch.int64)
        indices = keys % len(self)
        targets = torch.from_numpy(self.targets[indices.numpy()])
        if self.encoded:
            return pack([self.read_encoded(i) for i in indices.tolist()]), targets, keys
        size = self.image_size
        images = torch.empty(len(keys), 3, size, size, dtype=torch.uint8)
        for j, key in enumerate(keys.tolist()):
            epoch, i = divmod(key, len(self))
            images[j] = self.transform(self.decode(i), epoch, i)
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

    def decode(self, i: int, data: torch.Tensor | None = None) -> torch.Tensor:
        """The image (from its bytes when given) as uint8 RGB (3 x H x W) on the CPU, or one error naming the file."""
        data = self.read(i) if data is None else data
        try:
            return decode_bytes(data)
        except Exception as e:
            raise self.error(i, e) from None

    def error(self, i: int, error: Exception) -> BsdistError:
        path = os.path.join(self.root, self.paths[i])
        reason = "it does not exist" if not os.path.exists(path) else f"it cannot be decoded ({decoder_message(error)})"
        return BsdistError(f"image {path}: {reason}; {CHECK_DATA_HINT}")

    def read_encoded(self, i: int) -> torch.Tensor:
        """A grey or colour JPEG file's bytes for the device to decode; any other file decoded here (3 x H x W):
        nvJPEG as torchvision calls it has no CMYK conversion, which libjpeg-turbo here has."""
        data = self.read(i)
        return data if jpeg_channels(memoryview(data.numpy())) in (1, 3) else self.decode(i, data)

    def decode_batch(self, packed: tuple, keys: torch.Tensor, device: torch.device) -> torch.Tensor:
        """An encoded batch (`__getitems__` with encoded=True) decoded and cropped on `device`: uint8 N x S x S x 3."""
        n, size = len(self), self.image_size
        items, keys = unpack(*packed), keys.tolist()
        jpegs = [j for j, item in enumerate(items) if item.dim() == 1]
        decoded = dict(zip(jpegs, self.decode_jpegs([items[j] for j in jpegs], [keys[j] % n for j in jpegs], device)))
        images = torch.empty(len(items), 3, size, size, dtype=torch.uint8, device=device)
        for j, key in enumerate(keys):
            epoch, i = divmod(key, n)
            image = decoded[j] if j in decoded else items[j].to(device, non_blocking=True)
            images[j] = self.transform(image, epoch, i)
        return images.permute(0, 2, 3, 1)

    def decode_jpegs(self, data: list[torch.Tensor], indices: list[int], device: torch.device) -> list[torch.Tensor]:
        """JPEG bytes decoded on `device` in one call; when the decoder refuses the batch, one by one, and a
        file it refuses on the CPU, or one error naming the file. Running out of device memory is not a refusal."""
        if not data:
            return []
        try:
            return decode_jpegs_on(data, device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass  # which file, and whether the CPU can read it, is found below
        images = []
        for item, i in zip(data, indices):
            try:
                images += decode_jpegs_on([item], device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                images.append(self.decode(i, item).to(device))
        return images

    def transform(self, image: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
        """The training crop of (seed, epoch, image), or the evaluation centre crop, on the image's device."""
        from torchvision.transforms.v2 import functional as TF
        size = [self.image_size] * 2
        if self.random_crop:
            top, left, h, w = crop_box(image.shape[1], image.shape[2], np.random.default_rng([self.seed, epoch, i]))
            return TF.resized_crop(image, top, left, h, w, size, antialias=True)
        resized = TF.resize(image, round(self.image_size * 256 / 224), antialias=True)
        return TF.center_crop(resized, size)


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
