"""Files that lie about their size or end early, on generated files: refused from the header before any decode,
or from libjpeg's warnings, in the workers, on the device path and in --check-data; and a large legitimate
JPEG decoded reduced in the DCT, its crops close to a full decode's."""

import os
import sys

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image, JpegImagePlugin

from bsdist import BsdistError, config
from bsdist.data.check import check_data
from bsdist.data.decoding import CorruptScan, Header, decode_bytes, header_problem, read_header
from bsdist.data.imagefiles import ImageFiles
from bsdist.train import main
import tiny_model
from image_files import append, claiming, encoded, scan_cut_short, write_large_jpeg, write_list_dataset

tiny_model.register()
LARGE = (9000, 12000)  # height, width: 108 M pixels, above PIL's limit of 89.5 M
ENOUGH = 200_000_000  # DATASET.max_image_pixels where such images are legitimate


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small list dataset, and beside it the files that lie and the large one."""
    root = tmp_path_factory.mktemp("lying")
    write_list_dataset(str(root), [6, 5], test_per_class=2, size=16)
    small_jpeg, small_png = (encoded(Image.new("RGB", (64, 64), (90, 30, 200)), fmt) for fmt in ("JPEG", "PNG"))
    files = {"claims30k.jpg": claiming(small_jpeg, 30000, 30000), "claims60k.jpg": claiming(small_jpeg, 60000, 60000),
             "claims30k.png": claiming(small_png, 30000, 30000), "cut.jpg": scan_cut_short()}
    for name, data in files.items():
        (root / name).write_bytes(data)
    write_large_jpeg(str(root / "large.jpg"), *LARGE[::-1])
    return root


def files_of(root, names, random_crop=True, encoded=False, max_pixels=89_478_485, size=64):
    return ImageFiles(str(root), names, np.zeros(len(names)), size, random_crop, seed=0, encoded=encoded,
                      max_pixels=max_pixels)


@pytest.fixture
def no_decoding(monkeypatch):
    """Every decoder bsdist calls, made to fail the test if called."""
    def refuse(*args, **kwargs):
        raise AssertionError("a decode was started")
    for name in ("decode_image", "decode_jpeg"):
        monkeypatch.setattr(torchvision.io, name, refuse)
    monkeypatch.setattr(JpegImagePlugin, "JpegImageFile", refuse)


@pytest.mark.parametrize("name, claim", [("claims30k.jpg", "30,000 x 30,000"), ("claims60k.jpg", "60,000 x 60,000"),
                                         ("claims30k.png", "30,000 x 30,000")])
def test_a_header_claiming_too_many_pixels_is_refused_before_any_decode_in_workers_and_on_the_device_path(
        root, no_decoding, name, claim):
    assert len((root / name).read_bytes()) < 1000
    expected = (f"image {root}/{name}: its header claims {claim} pixels, more than DATASET.max_image_pixels "
                "89,478,485 (raise it where images this large are legitimate); list every bad file with python "
                "launch.py CONFIG --check-data --decode")
    for encoded_ in (False, True):  # the workers decode; the workers read bytes for the device
        for random_crop in (True, False):
            with pytest.raises(BsdistError) as caught:
                files_of(root, [name], random_crop, encoded_).__getitems__([0])
            assert str(caught.value) == expected


def test_header_sizes_of_every_format_torchvision_reads():
    image = Image.new("RGB", (300, 123), (1, 2, 3))
    for fmt, options in [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {"lossless": True}), ("WEBP", {}),
                         ("JPEG", {"progressive": True})]:
        assert read_header(encoded(image, fmt, **options))[:2] == (123, 300), (fmt, options)
    assert read_header(encoded(Image.new("RGBA", (300, 123)), "WEBP"))[:2] == (123, 300)  # the extended (VP8X) layout
    assert read_header(encoded(image, progressive=True)) == Header(123, 300, 0xC2, 3)
    assert read_header(b"BM" + bytes(60)) is None


def test_a_sequential_jpeg_too_short_for_its_frame_is_refused_however_high_the_limit(root, no_decoding):
    data = (root / "claims30k.jpg").read_bytes()
    problem = f"its {len(data)} bytes cannot hold the 30,000 x 30,000 pixels its header claims"
    assert read_header(data) == Header(30000, 30000, 0xC0, 3)
    assert header_problem(read_header(data), len(data), 10**10) == problem
    with pytest.raises(BsdistError, match=f"claims30k.jpg: {problem}"):
        files_of(root, ["claims30k.jpg"], max_pixels=10**10).__getitems__([0])
    large = (root / "large.jpg").read_bytes()
    assert header_problem(read_header(large), len(large), 10**10) is None  # flat, but every block coded


def test_a_scan_that_ends_early_is_corrupt_wherever_it_is_decoded(root, capfd):
    data = torchvision.io.read_file(str(root / "cut.jpg"))
    assert header_problem(read_header(data.numpy()), len(data), 89_478_485) is None  # its frame header is honest
    with pytest.raises(CorruptScan, match="^Corrupt JPEG data: premature end of data segment$"):
        decode_bytes(data)
    expected = (rf"image {root}/cut.jpg: it cannot be decoded \(Corrupt JPEG data: premature end of data segment\); "
                "list every bad file with python launch.py CONFIG --check-data --decode")
    with pytest.raises(BsdistError, match=expected):
        files_of(root, ["cut.jpg"]).__getitems__([0])
    device_path = files_of(root, ["cut.jpg"], encoded=True)
    packed, _, keys = device_path.__getitems__([0])
    with pytest.raises(BsdistError, match=expected):  # the CPU stands in for the device: libjpeg decodes the batch
        device_path.decode_batch(packed, keys, torch.device("cpu"))
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # told once, in the error, not on stderr as well


def test_check_data_names_every_lying_file_and_writes_whole_lines_to_a_file(root, tmp_path, monkeypatch, capsys):
    train = root / "with_liars.txt"
    train.write_text((root / "train.txt").read_text())
    for name in ("claims30k.jpg", "claims60k.jpg", "claims30k.png", "cut.jpg"):
        append(str(train), f"{name} 0")
    cfg = config.validate(config.load(None, ["DATASET.name", "ImageList", "DATASET.datadir", str(root),
                                             "DATASET.train_list", str(train), "DATASET.test_list", "test.txt",
                                             "DATASET.image_size", "16"]))
    log = tmp_path / "check.log"
    with open(log, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        assert check_data(cfg, decode=True) == 1
    out = capsys.readouterr().out
    assert "problems: 4" in out
    for name, claim in (("claims30k.jpg", "30,000 x 30,000"), ("claims60k.jpg", "60,000 x 60,000"),
                        ("claims30k.png", "30,000 x 30,000")):
        assert f"  {root}/{name}: its header claims {claim} pixels, more than DATASET.max_image_pixels" in out
    assert f"  cannot decode {root}/cut.jpg: Corrupt JPEG data: premature end of data segment" in out
    written = log.read_text()
    assert "\r" not in written and written.endswith("\n")  # 11 + 4 training images, 4 test images
    assert all(line.startswith("decoded ") and line.endswith(" bad") for line in written.splitlines())
    assert written.splitlines()[-1].startswith("decoded 19 / 19 images (") and written.endswith("4 bad\n")


@pytest.fixture(scope="module")
def large_full(root):
    """large.jpg decoded whole, once: what the reduced decodes are compared with."""
    return decode_bytes(torchvision.io.read_file(str(root / "large.jpg")))


@pytest.mark.parametrize("random_crop", [True, False])
def test_a_large_jpeg_is_decoded_reduced_and_cropped_close_to_a_full_decode(root, large_full, random_crop):
    """Reduced in the DCT by the largest of 8, 4, 2 that leaves the crop 64 pixels a side, its crop box drawn on
    the size in the header and scaled: within 2 levels (of 255) on average of the full decode's crop, while the
    crop of another epoch is far off, so the tolerance would catch a crop in the wrong place."""
    files = files_of(root, ["large.jpg"], random_crop, max_pixels=ENOUGH)
    with pytest.raises(BsdistError, match=r"large.jpg: its header claims 12,000 x 9,000 pixels, more than "
                                          r"DATASET.max_image_pixels 89,478,485"):
        files_of(root, ["large.jpg"]).__getitems__([0])
    for epoch in range(3):
        image, size = files.decode(0, epoch)
        assert size == LARGE and tuple(image.shape) == (3, 1125, 1500)  # 1/8: the smallest crop keeps 2,500 px a side
        crop = files.transform(image, size, epoch, 0)
        full = files.transform(large_full, size, epoch, 0)
        assert crop.shape == (3, 64, 64) and (crop.float() - full.float()).abs().mean() < 2
        if random_crop:
            other = files.transform(large_full, size, epoch + 1, 0)
            assert (crop.float() - other.float()).abs().mean() > 20
        batch, _, _ = files.__getitems__([epoch])
        assert torch.equal(batch[0], crop.permute(1, 2, 0))
    on_device = files_of(root, ["large.jpg"], random_crop, encoded=True, max_pixels=ENOUGH)
    packed, _, keys = on_device.__getitems__([0, 1])
    assert packed[2][:, :2].tolist() == [[1125, 1500]] * 2  # decoded reduced in the worker, not sent as bytes
    assert torch.equal(on_device.decode_batch(packed, keys, torch.device("cpu")), files.__getitems__([0, 1])[0])


def test_a_run_trains_on_a_large_jpeg_where_the_limit_allows_it(root, tmp_path):
    train = root / "with_large.txt"
    train.write_text((root / "train.txt").read_text())
    append(str(train), "large.jpg 1")

    def cfg(savedir, *overrides):
        return config.validate(config.load(None, [
            "DATASET.name", "ImageList", "DATASET.datadir", str(root), "DATASET.train_list", str(train),
            "DATASET.test_list", "test.txt", "DATASET.image_size", "16", "DATASET.aug_info", "[RandomResizedCrop]",
            "DATASET.batch_size", "4", "DATASET.num_workers", "0", "DEFAULT.savedir", str(tmp_path / savedir),
            "TRAIN.epochs", "1", "TRAIN.device", "cpu", "TRAIN.compile", "false", "MODEL.name", "tiny_fc",
            *overrides]))
    with pytest.raises(BsdistError, match="large.jpg: its header claims 12,000 x 9,000 pixels"):
        main(cfg("refused"))
    main(trained := cfg("trained", "DATASET.max_image_pixels", str(ENOUGH)))
    assert os.path.isfile(os.path.join(config.run_dir(trained), "last.pt"))


def test_other_output_of_the_decoders_still_reaches_stderr(capfd):
    from bsdist.data.decoding import libjpeg_checked

    def chatty():
        os.write(2, b"some other library's notice\n")
        return 7
    assert libjpeg_checked(chatty) == 7
    assert capfd.readouterr().err == "some other library's notice\n"
