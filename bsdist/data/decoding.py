"""An image file's bytes to uint8 RGB pixels, refusing what a header lies about before any decoding starts.

A file's header says how many pixels its decoder will allocate, and nothing checks that claim against
the data behind it: a JPEG of a few hundred bytes whose frame header says 30000 x 30000 makes
libjpeg-turbo allocate 2.7 GB and fill the rows its scan lacks with grey. So every file's size is read
from its header first (JPEG frame header, PNG IHDR, GIF screen, WebP VP8/VP8L/VP8X: the formats
torchvision decodes) and a size above DATASET.max_image_pixels (PIL's limit by default) is refused
without decoding. A scan that libjpeg finds ending early or corrupt is refused too: torchvision's
decoder only prints libjpeg's warnings and returns the grey rows, so the decode here reads them back
from file descriptor 2.

Images above REDUCE_ABOVE_PIXELS are decoded reduced in the DCT (libjpeg's 1/2, 1/4 or 1/8 scaling,
through PIL's `draft`) to the smallest size that still covers what their crop needs.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
import warnings
from typing import NamedTuple

import torch

JPEG_START = b"\xff\xd8"
# Above this many pixels (a 4096 x 4096 image, 50 MB decoded) a JPEG is decoded reduced where its crop
# allows; below, as before, with torchvision, alike on the CPU and on the device
REDUCE_ABOVE_PIXELS = 4096 * 4096
MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: DATASET.max_image_pixels' default
REDUCTIONS = (8, 4, 2)  # libjpeg's scaled IDCT; PIL's draft picks among these
# libjpeg's warnings that mean the pixels are not the file's: JWRN_HIT_MARKER ("premature end of data segment"),
# bad Huffman or arithmetic codes, markers where data belongs, JWRN_JPEG_EOF
CORRUPT = re.compile(r"Corrupt JPEG data[^\n]*|Premature end of JPEG file")
# torchvision 0.29 announces that TorchCodec will take over its image decoding; until then it is the
# libjpeg-turbo decoder bsdist measured, and the notice would repeat in every DataLoader worker
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def jpeg_frame(data: bytes | memoryview) -> tuple[int, int, int, int] | None:
    """(start-of-frame marker, height, width, colour components) of a JPEG file's frame header, or None when
    the bytes are not a JPEG or end before it."""
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
            if at + 9 >= len(data):
                return None
            return (marker, int.from_bytes(data[at + 5:at + 7], "big"), int.from_bytes(data[at + 7:at + 9], "big"),
                    data[at + 9])
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


def jpeg_channels(data: bytes | memoryview) -> int | None:
    """The number of colour components in a JPEG file's frame header (1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK),
    or None when the bytes are not a JPEG or end before the frame header."""
    frame = jpeg_frame(data)
    return frame[3] if frame else None


class Header(NamedTuple):
    height: int
    width: int
    frame: int | None  # a JPEG's start-of-frame marker: 0xC0 baseline, 0xC2 progressive, ...
    components: int | None  # a JPEG's colour components


def read_header(data: bytes | memoryview) -> Header | None:
    """The size a file's header claims (and a JPEG's frame), or None for a format torchvision does not decode."""
    data = bytes(data)  # a copy indexes faster than a view of the tensor's memory
    if data[:2] == JPEG_START:
        frame = jpeg_frame(data)
        return Header(frame[1], frame[2], frame[0], frame[3]) if frame else None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return Header(int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"), None, None)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return Header(int.from_bytes(data[8:10], "little"), int.from_bytes(data[6:8], "little"), None, None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        if chunk == b"VP8X":  # the canvas, 24-bit sizes minus one
            return Header(int.from_bytes(data[27:30], "little") + 1, int.from_bytes(data[24:27], "little") + 1,
                          None, None)
        if chunk == b"VP8L":  # 14-bit sizes minus one after the signature byte
            bits = int.from_bytes(data[21:25], "little")
            return Header(((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1, None, None)
        if chunk == b"VP8 ":  # a key frame: 14-bit sizes after the start code
            return Header(int.from_bytes(data[28:30], "little") & 0x3FFF,
                          int.from_bytes(data[26:28], "little") & 0x3FFF, None, None)
    return None


def header_problem(header: Header | None, length: int, max_pixels: int) -> str | None:
    """Why a file of `length` bytes with this header must not be decoded, or None."""
    if header is None:
        return None  # not an image torchvision reads: its decoder says so
    height, width = header.height, header.width
    if height * width > max_pixels:
        return (f"its header claims {width:,} x {height:,} pixels, more than DATASET.max_image_pixels "
                f"{max_pixels:,}")
    # A sequential Huffman scan (SOF0, SOF1) codes every 8 x 8 block of its full-resolution component with at
    # least a 1-bit DC and a 1-bit AC code: a file shorter than 2 bits per 64 pixels cannot hold the frame
    # it announces. Progressive and arithmetic scans can code runs of blocks in fewer bits, so no bound there
    if header.frame in (0xC0, 0xC1) and length * 8 < 2 * (height // 8) * (width // 8):
        return f"its {length:,} bytes cannot hold the {width:,} x {height:,} pixels its header claims"
    return None


def reduction(height: int, width: int, need: int) -> int:
    """The largest of libjpeg's reductions (8, 4, 2, else 1) that leaves at least `need` pixels on each side of
    an image (or crop) of height x width: decoding reduced by it loses nothing the resize to `need` keeps."""
    return next((k for k in REDUCTIONS if min(height, width) // k >= need), 1)


_capture = threading.Lock()
_capture_file: dict[int, int] = {}  # process id -> file descriptor: a forked worker must not share its parent's


class CorruptScan(RuntimeError):
    """libjpeg decoded the file but warned that its pixels are not all the file's (a RuntimeError, as the
    decoders' own refusals are)."""


def libjpeg_checked(decode, *args, **kwargs):
    """decode(*args, **kwargs) (a torchvision decoder), refusing what libjpeg calls corrupt or cut short.

    libjpeg prints its warnings (the first of each decode) with fprintf(stderr) and torchvision returns the
    image regardless, its missing rows grey, so the decode runs with file descriptor 2 pointed at a file of
    this process and what libjpeg printed is read back. No check on the bytes alone sees a scan that stops
    before its frame is full while the file still ends with its end-of-image marker, and PIL (whose decoder
    discards the warnings) returns such a file's grey rows too. A lock keeps other threads from decoding
    meanwhile; what else was printed goes on to stderr."""
    with _capture:
        pid = os.getpid()
        if pid not in _capture_file:
            _capture_file[pid] = _new_capture_file()
        fd, saved = _capture_file[pid], os.dup(2)
        os.dup2(fd, 2)
        try:
            result = decode(*args, **kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        printed = os.lseek(fd, 0, os.SEEK_CUR)
        if not printed:
            return result
        text = os.pread(fd, printed, 0).decode(errors="replace")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # fd 2's duplicate shares this offset
    other = CORRUPT.sub("", text).strip()
    if other:
        os.write(2, (other + "\n").encode())
    corrupt = CORRUPT.search(text)
    if corrupt:
        raise CorruptScan(corrupt.group(0).strip())
    return result


def _new_capture_file() -> int:
    fd, path = tempfile.mkstemp(prefix="bsdist-decoder-")
    os.unlink(path)  # gone when the process is
    return fd


def decode_bytes(data: torch.Tensor, reduce: int = 1) -> torch.Tensor:
    """A file's bytes decoded on the CPU as uint8 RGB (3 x H x W): JPEG (libjpeg-turbo; grayscale and CMYK
    converted), PNG, GIF and WebP, through torchvision; reduce 2, 4 or 8: a JPEG reduced in the DCT (H and W
    divided by it, rounded up) through PIL. A scan libjpeg calls corrupt or cut short raises CorruptScan."""
    from torchvision.io import ImageReadMode, decode_image
    if reduce > 1:
        return _decode_reduced(data, reduce)
    return libjpeg_checked(decode_image, data, mode=ImageReadMode.RGB)


def _decode_reduced(data: torch.Tensor, reduce: int) -> torch.Tensor:
    """PIL's JPEG plugin opened directly: Image.open's own size limit is DATASET.max_image_pixels' to set, and was
    checked. PIL discards libjpeg's warnings, so a corrupt scan goes unnoticed here unless it is cut short
    (PIL raises) or too short for its frame (header_problem)."""
    import numpy as np
    from PIL import JpegImagePlugin
    image = JpegImagePlugin.JpegImageFile(io.BytesIO(data.numpy().tobytes()))
    width, height = image.size
    image.draft("RGB", (width // reduce, height // reduce))  # the largest scale these sizes allow: `reduce`
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def decoder_message(error: Exception) -> str:
    """The decoder's reason in its own words, without the C++ source location torchvision puts first."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\w+, \S+:\d+, ", "", text)[:100]
