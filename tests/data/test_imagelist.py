"""Image-list datasets on generated JPEG trees: lists and folders, presets' profiles, --check-data, the
decoded and cropped batches, and training from files (exact evaluation on 2 ranks, resume mid-epoch)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_model
from bsdist import BsdistError, checkpoint, config
from bsdist.data import build_data, is_file_list, load_splits
from bsdist.data.check import check_data
from bsdist.data.imagelist import PRESETS, listings, profile_problems
from bsdist.data.longtail import long_tail_counts
from bsdist.distributed import DistEnv, init_distributed, shutdown
from bsdist.train import main
from image_files import append, write_folder_dataset, write_list_dataset
from runs import run_until
from spawn import run_ranks

tiny_model.register()
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_COUNTS = [40, 24, 14, 9, 6, 4]


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagelist"))
    write_list_dataset(root, TRAIN_COUNTS, test_per_class=5, val_per_class=3, size=20, crlf=True)
    return root


def cfg_for(root, savedir, *overrides, lists_named=True):
    named = (["DATASET.train_list", "train.txt", "DATASET.val_list", "val.txt", "DATASET.test_list", "test.txt"]
             if lists_named else [])
    return config.validate(config.load(None, [
        "DATASET.name", "ImageList", "DATASET.datadir", root, *named, "DATASET.image_size", "16",
        "DATASET.aug_info", "[RandomResizedCrop, RandomHorizontalFlip]", "DATASET.batch_size", "16",
        "DATASET.test_batch_size", "7", "DATASET.num_workers", "0", "DEFAULT.savedir", str(savedir),
        "TRAIN.epochs", "2", "TRAIN.device", "cpu", "TRAIN.compile", "false", "MODEL.name", "tiny_fc",
        "SCHEDULER.params.warmup_epochs", "0",
        *overrides]))


def test_a_list_dataset_is_used_as_listed_with_its_validation_split(lists, tmp_path):
    cfg = cfg_for(lists, tmp_path)
    assert cfg.DATASET.imbalance_type is None and cfg.DEFAULT.exp_name == "BalancedSoftmax-as_listed"
    loaded = load_splits(cfg)
    assert np.bincount(loaded.train.targets).tolist() == TRAIN_COUNTS  # CRLF lines read, nothing subsampled
    assert {k: len(v) for k, v in loaded.eval.items()} == {"val": 18, "test": 30}
    assert loaded.num_classes == 6 and loaded.class_names is None and loaded.in_channels == 3 and loaded.files


def test_batches_are_decoded_cropped_and_resized_to_uint8_and_a_crop_depends_on_seed_epoch_and_image(lists, tmp_path):
    loaded = load_splits(cfg_for(lists, tmp_path))
    n = len(loaded.train)
    images, targets, indices = loaded.train.__getitems__([3, 5, n + 3])  # image 3 in epochs 0 and 1, image 5
    assert images.shape == (3, 16, 16, 3) and images.dtype == torch.uint8
    assert indices.tolist() == [3, 5, 3] and targets.tolist() == [loaded.train.targets[i] for i in (3, 5, 3)]
    again, _, _ = loaded.train.__getitems__([3])
    assert torch.equal(again[0], images[0]) and not torch.equal(images[0], images[2])  # same draw; another epoch
    test = loaded.eval["test"]
    a, _, _ = test.__getitems__([0])
    b, _, _ = test.__getitems__([len(test)])  # evaluation crops do not depend on the epoch
    assert torch.equal(a, b)
    raw, size = test.decode(0)
    assert raw.shape[0] == 3 and raw.shape[1] > raw.shape[2]  # the files are taller than wide: a real resize
    assert size == tuple(raw.shape[1:])  # small files are decoded whole


def test_an_image_too_wide_or_tall_for_any_crop_ratio_is_cropped_inside_it_as_torchvision_does(tmp_path):
    from bsdist.data.imagefiles import ImageFiles
    for name, (w, h) in {"wide.png": (200, 10), "tall.png": (10, 200)}.items():
        Image.new("RGB", (w, h), (200, 100, 50)).save(tmp_path / name)
    files = ImageFiles(str(tmp_path), ["wide.png", "tall.png"], np.zeros(2), 16, True, seed=0)
    for epoch in range(5):  # no area of 8% or more at a ratio in 3/4..4/3 fits: the centre crop of ratio 4/3 or 3/4
        images, _, _ = files.__getitems__([epoch * 2, epoch * 2 + 1])
        assert images.shape == (2, 16, 16, 3) and int(images.min()) > 0  # nothing padded with zeros
        assert images[..., 0].eq(200).all() and images[..., 2].eq(50).all()


def test_a_class_folder_tree_keeps_its_names_and_a_balanced_tree_becomes_long_tailed(tmp_path):
    root = str(tmp_path / "folders")
    names = ["ant", "bee", "cat", "dog", "eel"]
    write_folder_dataset(root, [20] * 5, test_per_class=4, names=names, size=16)
    as_it_is = load_splits(cfg_for(root, tmp_path, lists_named=False))
    assert as_it_is.class_names == names and np.bincount(as_it_is.train.targets).tolist() == [20] * 5
    assert set(as_it_is.eval) == {"test"} and len(as_it_is.eval["test"]) == 20
    long_tailed = load_splits(cfg_for(root, tmp_path, "DATASET.imbalance_type", "exp", "DATASET.imbalance_factor", "10",
                                      "DATASET.val_per_cls", "2", lists_named=False))
    assert np.bincount(long_tailed.train.targets).tolist() == long_tail_counts(90, 5, "exp", 10)
    assert len(long_tailed.eval["val"]) == 10


def test_the_config_accepts_exactly_the_datasets_of_the_data_registry():
    names = config.FIELDS["DATASET.name"].choices
    assert names == ("CIFAR10LT", "CIFAR100LT", "DigitsLT", "ImageList", "ImageNetLT", "PlacesLT", "iNat2018")
    assert [n for n in names if is_file_list(n)] == ["ImageList", *PRESETS]


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_checks_the_published_profile_of_its_lists(tmp_path, name):
    preset = PRESETS[name]
    c, profile = preset.num_classes, preset.profile
    largest, smallest = profile.get("largest", 1000), profile.get("smallest", 2)
    rest = profile["train"] - largest - smallest  # shared as evenly as can be by the other classes
    counts = np.array([largest, smallest] + [rest // (c - 2) + (i < rest % (c - 2)) for i in range(c - 2)])
    assert counts.sum() == profile["train"]
    for split, list_name in preset.lists.items():
        per_class = counts if split == "train" else np.full(c, profile[split] // c)
        per_class[: profile[split] - per_class.sum()] += 1
        labels = np.repeat(np.arange(c), per_class)
        (tmp_path / list_name).write_text("".join(f"{split}/{label}/{i}.jpg {label}\n"
                                                  for i, label in enumerate(labels)))
    d = config.validate(config.load(None, ["DATASET.name", name, "DATASET.datadir", str(tmp_path)])).DATASET
    splits, num_classes, _ = listings(d)
    assert num_classes == c and profile_problems(d, splits) == []
    train = tmp_path / preset.lists["train"]
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:-1]))  # a truncated list
    splits, _, _ = listings(d)
    assert profile_problems(d, splits)[0].startswith(f"{name} train: expected {profile['train']:,}, "
                                                     f"found {profile['train'] - 1:,}")


def test_check_data_names_every_problem_and_accepts_every_image_kind(lists, tmp_path, capsys):
    root = tmp_path / "broken"
    write_list_dataset(str(root), [8, 6, 5], test_per_class=3, size=16)
    train = str(root / "train.txt")
    special = root / "train" / "odd name dir"
    special.mkdir()
    Image.new("L", (20, 18), 128).save(special / "grey image.jpg")  # grayscale, with a space in its path
    Image.new("CMYK", (18, 20), (10, 200, 30, 0)).save(special / "cmyk.jpg")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(special / "png.png")
    for rel in ("grey image.jpg", "cmyk.jpg", "png.png"):
        append(train, f"train/odd name dir/{rel} 1")
    (root / "clean.txt").write_text((root / "train.txt").read_text())
    (root / "clean_test.txt").write_text((root / "test.txt").read_text())
    good = (root / "train" / "c000" / "00000.jpg").read_bytes()
    (root / "train" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    append(train, "train/truncated.jpg 0")
    append(train, "train/gone.jpg 2")
    append(train, "train/c000/00001.jpg 0")  # the same file again
    append(test := str(root / "test.txt"), "test/c000/00000.jpg 7")  # a label beyond the 3 classes
    cfg = config.validate(config.load(None, ["DATASET.name", "ImageList", "DATASET.datadir", str(root),
                                             "DATASET.train_list", "train.txt", "DATASET.test_list", test]))
    assert check_data(cfg, decode=True) == 1
    out = capsys.readouterr().out
    assert ("train: 24 images, 3 classes, largest 9, smallest 6" in out
            and "many / medium / few-shot classes: 0 / 0 / 3" in out)
    assert "train.txt:25: duplicate of line 2 (train/c000/00001.jpg)" in out
    assert "test.txt:10: label 7 outside 0..2" in out
    assert f"missing file {root}/train/gone.jpg" in out
    assert f"cannot decode {root}/train/truncated.jpg: Image is incomplete or truncated" in out
    assert "problems: 4" in out and "grey image" not in out and "cmyk" not in out and "png.png" not in out
    loaded = load_splits(config.validate(config.load(None, ["DATASET.name", "ImageList", "DATASET.datadir", str(root),
                                                            "DATASET.train_list", "clean.txt", "DATASET.test_list",
                                                            "clean_test.txt", "DATASET.image_size", "12"])))
    names = [os.path.basename(p) for p in loaded.train.paths]
    for name in ("grey image.jpg", "cmyk.jpg", "png.png"):
        image, _, _ = loaded.train.__getitems__([names.index(name)])
        assert image.shape == (1, 12, 12, 3)  # converted to RGB
    assert check_data(cfg_for(lists, tmp_path), decode=True) == 0 and "problems: none" in capsys.readouterr().out


def test_a_missing_image_stops_training_in_one_line_even_from_a_worker(lists, tmp_path):
    root = tmp_path / "copy"
    write_list_dataset(str(root), [20, 20], test_per_class=2, size=16)
    append(str(root / "train.txt"), "train/c000/nowhere.jpg 0")
    cfg = cfg_for(str(root), tmp_path, "DATASET.val_list", "null", "DATASET.num_workers", "2",
                  "DATASET.batch_size", "41")
    with pytest.raises(BsdistError) as caught:
        main(cfg)
    message = str(caught.value)
    assert message.startswith(f"image {root}/train/c000/nowhere.jpg: it does not exist; list every bad file with "
                              "python launch.py CONFIG --check-data --decode") and "Traceback" not in message


def test_a_list_that_cannot_be_used_is_one_line(lists, tmp_path):
    with pytest.raises(BsdistError,
                       match=r"list .*nothing.txt does not exist; set DATASET.datadir to the folder that holds"):
        load_splits(cfg_for(lists, tmp_path, "DATASET.train_list", "nothing.txt"))
    with pytest.raises(BsdistError, match="val.txt is a validation split already; set DATASET.val_per_cls 0"):
        load_splits(cfg_for(lists, tmp_path, "DATASET.val_per_cls", "2"))
    with pytest.raises(BsdistError, match="RandomResizedCrop crops image files as they are decoded"):
        config.validate(config.load(None, ["DATASET.aug_info", "[RandomResizedCrop]"]))


def test_a_list_with_a_byte_order_mark_is_read_and_one_not_in_utf8_is_one_problem_naming_its_line(tmp_path, capsys):
    root = tmp_path / "windows"
    write_list_dataset(str(root), [8, 6, 5], test_per_class=3, size=16)
    train = root / "train.txt"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())  # as Notepad saves UTF-8
    cfg = config.validate(config.load(None, ["DATASET.name", "ImageList", "DATASET.datadir", str(root),
                                             "DATASET.train_list", "train.txt", "DATASET.test_list", "test.txt"]))
    assert check_data(cfg) == 0 and "train: 19 images" in capsys.readouterr().out
    assert listings(cfg.DATASET)[0]["train"].paths[0] == "train/c000/00000.jpg"  # the mark is no part of the path

    lines = train.read_bytes().splitlines(keepends=True)
    lines[2] = "train/c000/caf\u00e9.jpg 0\n".encode("latin-1")  # a name saved in another encoding
    train.write_bytes(b"".join(lines))
    assert check_data(cfg) == 1
    out = capsys.readouterr().out
    problem = f"{train}:3: not UTF-8 (byte 0xe9: invalid continuation byte); save the list as UTF-8"
    assert out.splitlines()[-2:] == ["problems: 1", f"  {problem}"], out
    with pytest.raises(BsdistError) as caught:
        load_splits(cfg)
    assert str(caught.value).startswith(problem) and "missing file" not in str(caught.value)


def test_the_frame_header_says_which_jpeg_files_the_device_decodes():
    import io

    from bsdist.data.decoding import jpeg_channels

    def encoded(mode, fmt="JPEG", **options):
        out = io.BytesIO()
        Image.new(mode, (20, 18)).save(out, fmt, **options)
        return out.getvalue()
    exif = b"Exif\x00\x00" + b"x" * 5000  # an APP1 segment to skip before the frame header
    assert [jpeg_channels(encoded(mode, exif=exif)) for mode in ("L", "RGB", "CMYK")] == [1, 3, 4]
    assert jpeg_channels(encoded("RGB", progressive=True)) == 3 and jpeg_channels(encoded("RGB", subsampling=0)) == 3
    assert jpeg_channels(encoded("RGB", "PNG")) is None and jpeg_channels(encoded("RGB", exif=exif)[:300]) is None
    assert jpeg_channels(memoryview(np.frombuffer(encoded("CMYK"), np.uint8))) == 4


def test_nvjpeg_decodes_on_a_stream_of_its_own_that_the_training_stream_waits_for(monkeypatch):
    """CI has no GPU, so the CUDA branch runs against stand-ins for the streams: the decode must run with the
    side stream current (torchvision's decoder allocates on the current stream and writes from another), the
    training stream must wait for it, and each output must be held for the training stream (tests/test_gpu.py
    measures the overwrite itself on a GPU)."""
    import contextlib

    import torchvision.io

    from bsdist.data import device_decoding
    events, current = [], ["training"]

    class Stream:
        def __init__(self, name="side"):
            self.name = name
            events.append(("created", name))

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    class Image:
        def record_stream(self, stream):
            events.append(("record", stream.name))

    @contextlib.contextmanager
    def use(stream):
        current.append(stream.name)
        yield
        current.pop()

    def decode_jpeg(data, mode, device):
        events.append(("decode", current[-1], len(data)))
        return [Image() for _ in data]

    training = Stream("training")
    events.clear()
    monkeypatch.setattr(device_decoding, "_DECODE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: training)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    for n in (2, 1):
        decoded = device_decoding.decode_jpegs_on([torch.zeros(4, dtype=torch.uint8)] * n, torch.device("cuda", 0))
        assert len(decoded) == n
    assert events == [("created", "side"), ("decode", "side", 2), ("wait", "training", "side"), ("record", "training"),
                      ("record", "training"), ("decode", "side", 1), ("wait", "training", "side"),
                      ("record", "training")]


def test_decoding_on_the_device_gives_the_workers_batches_and_reads_every_kind_of_file(tmp_path, monkeypatch):
    import torchvision.io
    root = tmp_path / "kinds"
    write_list_dataset(str(root), [12, 8], test_per_class=4, size=20)
    odd = root / "train" / "odd"
    odd.mkdir()
    Image.new("L", (20, 18), 128).save(odd / "grey.jpg")
    Image.new("CMYK", (18, 20), (10, 200, 30, 0)).save(odd / "cmyk.jpg")
    Image.new("RGB", (16, 22), (1, 2, 3)).save(odd / "png.png")
    for name in ("grey.jpg", "cmyk.jpg", "png.png"):
        append(str(root / "train.txt"), f"train/odd/{name} 1")
    grey, cmyk = (torchvision.io.read_file(str(odd / name)) for name in ("grey.jpg", "cmyk.jpg"))
    decode_jpeg, refused, seen = torchvision.io.decode_jpeg, [], []

    def refusing_grey(data, mode, device):  # a file the device's decoder cannot read
        seen.extend(data)
        if any(torch.equal(item, grey) for item in data):
            refused.append(len(data))
            raise RuntimeError("unsupported JPEG")
        return decode_jpeg(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing_grey)
    init_distributed("cpu", 60)
    try:
        loaders = [build_data(cfg_for(str(root), tmp_path, "DATASET.val_list", "null", "DATASET.num_workers", "1",
                                      "DATASET.batch_size", "23", "DATASET.loader", loader), CPU)
                   for loader in ("dataloader", "device")]
        for epoch in (0, 1):
            for data in loaders:
                data.train_sampler.set_epoch(epoch)
            pairs = list(zip(loaders[0].train, loaders[1].train))
            assert len(pairs) == 1 and all(torch.equal(a, b) for pair in pairs for a, b in zip(*pair))  # all 23
        pairs = list(zip(loaders[0].eval["test"], loaders[1].eval["test"]))
        assert len(pairs) == 2 and all(torch.equal(a, b) for pair in pairs for a, b in zip(*pair))
    finally:
        shutdown()
    # each epoch's batch of 21 JPEG files (the PNG and the CMYK JPEG decoded in the worker), then the grey one alone
    assert refused == [21, 1] * 2 and not any(torch.equal(item, cmyk) for item in seen)
    files = loaders[1].train.dataset
    first, second, last = (files.paths.index(f"train/c00{c}/{j:05d}.jpg") for c, j in ((0, 0), (0, 1), (1, 19)))
    (root / files.paths[second]).write_bytes((root / files.paths[first]).read_bytes()[:300])
    (root / files.paths[last]).unlink()
    with pytest.raises(BsdistError, match=r"image .*c000/00001.jpg: it cannot be decoded \(Image is incomplete or "
                                          r"truncated\); list every bad file"):
        files.decode_batch(*files.__getitems__([first, second])[::2], torch.device("cpu"))
    with pytest.raises(BsdistError, match=r"image .*c001/00019.jpg: it does not exist; list every bad file"):
        files.__getitems__([last])


@pytest.mark.parametrize("broken", ["raises", "garbage"])
def test_a_broken_device_decoder_is_found_at_start_and_the_workers_decode_instead(lists, tmp_path, monkeypatch,
                                                                                  capsys, broken):
    from bsdist.data import device_decoding
    from bsdist.output import console
    console(0)
    monkeypatch.setattr(device_decoding, "_DECODER_WORKS", {})  # probed afresh, and forgotten after this test
    calls = []

    def broken_decoder(data, device):  # nvJPEG with a mismatched driver: every call fails, or decodes noise
        calls.append(len(data))
        if broken == "raises":
            raise RuntimeError("nvjpegDecodeBatchedPhaseOne failed: NVJPEG_STATUS_EXECUTION_FAILED")
        return [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in data]
    monkeypatch.setattr(device_decoding, "decode_jpegs_on", broken_decoder)
    init_distributed("cpu", 60)
    try:
        loaders = [build_data(cfg_for(lists, tmp_path, "DATASET.loader", loader), CPU) for loader in ("dataloader",
                                                                                                     "device")]
        assert type(loaders[1].train) is type(loaders[0].train)  # no DecodeOnDevice
        for a, b in zip(loaders[0].train, loaders[1].train):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        shutdown()
    assert calls == [1]  # the probe, once: no batch was sent to the broken decoder
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "decoding JPEG files on cpu fails" in warning
    assert ("NVJPEG_STATUS_EXECUTION_FAILED" if broken == "raises" else "not the CPU decoder's") in warning


def test_training_from_files_resumes_mid_epoch_exactly_and_alike_wherever_images_are_decoded(lists, tmp_path,
                                                                                               monkeypatch):
    common = ["TRAIN.ckpt_every_steps", "2", "TRAIN.resume", "auto", "OPTIMIZER.momentum", "0.9", "TRAIN.epochs", "2"]
    straight = main(cfg_for(lists, tmp_path / "straight", *common))
    cfg = cfg_for(lists, tmp_path / "resumed", *common, "DATASET.loader", "device", "DATASET.num_workers", "1")
    run_until(monkeypatch, cfg, lambda name, state: state["epoch"] == 1 and state["progress"]["step"] == 2)
    resumed = main(cfg)
    assert resumed["last"]["confusion"] == straight["last"]["confusion"]
    a = checkpoint.load(os.path.join(config.run_dir(cfg), "last.pt"))["model"]
    straight_dir = config.run_dir(cfg_for(lists, tmp_path / "straight", *common))
    b = checkpoint.load(os.path.join(straight_dir, "last.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_post_hoc_tuning_uses_the_validation_list(lists, tmp_path):
    from bsdist.posthoc import evaluate_run
    cfg = cfg_for(lists, tmp_path, "TRAIN.epochs", "1")
    main(cfg)
    variants = evaluate_run(config.run_dir(cfg), ["logit-adjust"])
    assert variants["logit-adjust"]["val"]["num_images"] == 18 and variants["logit-adjust"]["test"]["num_images"] == 30


def _evaluate_on_two_ranks(raw_cfg):
    import tiny_model
    tiny_model.register()
    env = init_distributed("cpu", 60)
    try:
        data = build_data(config.validate(raw_cfg, 2), env)
        return {split: sorted(int(i) for _, _, indices in loader for i in indices)
                for split, loader in data.eval.items()}
    finally:
        shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dataloader", "device"])
def test_two_ranks_evaluate_every_listed_image_exactly_once(lists, tmp_path, loader):
    results, errors = run_ranks(_evaluate_on_two_ranks, 2, cfg_for(lists, tmp_path, "DATASET.num_workers", "1",
                                                                   "DATASET.loader", loader))
    assert not errors, errors
    for split, size in (("val", 18), ("test", 30)):
        seen = results[0][split] + results[1][split]
        assert sorted(seen) == list(range(size)) and len(results[0][split]) == size // 2, split
    with open(os.path.join(lists, "test.txt")) as f:
        assert len(f.read().splitlines()) == 30
    json.dumps(results)
