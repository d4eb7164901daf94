"""JPEG files decoded on the training device (DATASET.loader device): one batched torchvision.io.decode_jpeg
call (nvJPEG on CUDA) on a stream of its own, and a probe at start that a broken decoder is found once."""

from __future__ import annotations

import logging

import torch

from bsdist.data.decoding import decode_bytes, decoder_message, libjpeg_checked

LOG = logging.getLogger("bsdist")


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def decode_jpegs_on(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG files' bytes (CPU) decoded as uint8 RGB on `device` in one torchvision.io.decode_jpeg call.

    On CUDA the call runs with a stream of its own current. torchvision 0.29's nvJPEG decoder allocates
    its outputs on the current stream but writes them from a pool stream that does not wait for that one
    (described in pytorch/vision pull request 9606), so with the training stream current it can be
    handed a block the training stream freed while its queued kernels still read it, and overwrite it. A
    stream of its own has freed only the decoder's earlier outputs, and record_stream holds each output
    back from reuse until the training stream's work on it is done; the training stream waits for the
    decode before it reads. tests/test_gpu.py (run by bench/gpu_check.py) counts both on a GPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    if device.type != "cuda":  # libjpeg-turbo, whose warnings say which scans are corrupt
        return libjpeg_checked(decode_jpeg, data, mode=ImageReadMode.RGB, device=device)
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
