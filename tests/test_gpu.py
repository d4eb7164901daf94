"""What only a GPU can show, run by `bench/gpu_check.py` (pytest -m gpu) in its one short GPU window; skipped
without CUDA. Each test reads the window's time left (BSDIST_GPU_DEADLINE, seconds since the epoch, set by
gpu_check.py) and skips, saying so, when its estimate does not fit; its runs' stdout and stderr (with
TORCH_LOGS=recompiles) stay in its tmp_path, which gpu_check.py puts under its --out folder.

BSDIST_GPU_TESTS_ON_CPU=1 rehearses the tests that can run on CPU (slowly: ResNet-18 runs)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from cifar_files import write_cifar
from paths import ROOT
from runs import clean_env

from bsdist import checkpoint

REHEARSAL = os.environ.get("BSDIST_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cpu" and not REHEARSAL, reason="needs CUDA (BSDIST_GPU_TESTS_ON_CPU=1 "
                                                                           "rehearses it on CPU)")]
DEADLINE = float(os.environ.get("BSDIST_GPU_DEADLINE", "inf"))
RUN_TIMEOUT_S = 300 if DEVICE == "cuda" else 900  # one launch.py run, start-up and compilation included
MODEL = "resnet18" if DEVICE == "cuda" else "resnet32"  # a CPU rehearsal trains the small CIFAR ResNet
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def within_budget(estimate_s: float) -> None:
    """Skip unless the GPU window has `estimate_s` left (this test's cost on one H100 / H200, compiles included)."""
    left = DEADLINE - time.time()
    if left < estimate_s:
        pytest.skip(f"budget: {left:.0f} s left of the GPU window, this test needs about {estimate_s:.0f} s")


def write_config(tmp_path, name: str, train_per_class: int, test_per_class: int, **train) -> str:
    """Generated CIFAR-10 whose classes differ (learnable) and the YAML the runs start from."""
    root = write_cifar(str(tmp_path / f"{name}-data"), 10, train_per_class=train_per_class,
                       test_counts=[test_per_class] * 10, learnable=True)
    cfg = {"DEFAULT": {"exp_name": "check"},
           "DATASET": {"name": "CIFAR10LT", "datadir": root, "batch_size": 32, "num_workers": 0, "imbalance_factor": 1},
           "OPTIMIZER": {"lr": 0.05, "momentum": 0.9},
           "SCHEDULER": {"params": {"warmup_epochs": 0}}, "MODEL": {"name": MODEL},
           "TRAIN": {"epochs": 1, "log_interval": 1000, "check_every_steps": 1, "compile": False,
                     "mixed_precision": "auto", "resume": "auto", "device": DEVICE, **train}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


class Run:
    """launch.py on a config, with `prefix` (torchrun, deterministic_launch.py); stdout and stderr to files
    named after the run in tmp_path, TORCH_LOGS=recompiles among the latter."""

    def __init__(self, tmp_path, name: str, config: str, overrides=(), prefix=(sys.executable, "launch.py"),
                 **env):
        self.run_dir = tmp_path / name / "CIFAR10LT" / MODEL / "check"
        self.logs = tmp_path / f"{name}-{len(list(tmp_path.glob(f'{name}-*.err')))}"
        self.what = f"run {name}"
        with open(f"{self.logs}.out", "w") as out, open(f"{self.logs}.err", "w") as err:
            self.proc = subprocess.Popen([*prefix, config, "DEFAULT.savedir", str(tmp_path / name), *overrides],
                                         cwd=ROOT, env=clean_env(TORCH_LOGS="recompiles", **env), stdout=out,
                                         stderr=err)

    def wait(self) -> Run:
        window_ends = DEADLINE - time.time() < RUN_TIMEOUT_S
        try:
            self.proc.wait(timeout=max(1.0, min(RUN_TIMEOUT_S, DEADLINE - time.time())))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            if window_ends:  # the estimate was short, not the run wrong
                pytest.skip(f"budget: the GPU window ended during {self.what} (logs {self.logs}.err)")
            pytest.fail(f"{self.what} did not finish within {RUN_TIMEOUT_S} s (logs {self.logs}.err)")
        self.out, self.err = (open(f"{self.logs}.{kind}").read() for kind in ("out", "err"))
        return self

    def succeeded(self) -> Run:
        self.wait()
        assert self.proc.returncode == 0, f"{self.what} exited {self.proc.returncode}: {self.err[-2000:]}"
        return self

    def stop_at_first_checkpoint(self) -> str:
        """SIGTERM once the first mid-epoch last.pt exists; the run must stop at a safe point, saying where."""
        path = self.run_dir / "last.pt"
        while not path.exists() and self.proc.poll() is None:
            time.sleep(0.01)
        self.proc.send_signal(signal.SIGTERM)
        self.wait()
        said = [line for line in self.err.splitlines() if "stopped by signal 15" in line]
        assert self.proc.returncode != 0 and said, f"{self.what} did not stop on SIGTERM: {self.err[-2000:]}"
        return said[-1]

    def weights(self) -> dict:
        return checkpoint.load(str(self.run_dir / "last.pt"))["model"]

    def last(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())["last"]


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every floating-point tensor of two state dicts (weights and BatchNorm statistics)."""
    keys = [k for k, v in a.items() if v.is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    return math.sqrt(diff / sum(float(a[k].double().pow(2).sum()) for k in keys))


def test_a_run_stopped_by_sigterm_resumes_exactly_in_deterministic_mode(tmp_path):
    """Deterministic kernels (tests/deterministic_launch.py), so the resumed run must equal the uninterrupted one
    bit for bit; mid-epoch checkpoints only in the run that is stopped; classes that differ, so that the runs
    learn and equal test metrics mean something."""
    within_budget(60)
    # on CUDA 156 steps an epoch, so that SIGTERM lands mid-epoch; on a CPU 6
    per_class, every = ((500, 100), "10") if DEVICE == "cuda" else ((20, 10), "2")
    config = write_config(tmp_path, "cifar", *per_class, epochs=2,
                          mixed_precision="bf16" if DEVICE == "cuda" else "no")
    deterministic = dict(prefix=(sys.executable, os.path.join(ROOT, "tests", "deterministic_launch.py")),
                         CUBLAS_WORKSPACE_CONFIG=":4096:8")
    straight = Run(tmp_path, "straight", config, **deterministic).succeeded()
    stopped_at = Run(tmp_path, "stopped", config, ["TRAIN.ckpt_every_steps", every], **deterministic)
    stopped_at = stopped_at.stop_at_first_checkpoint()
    resumed = Run(tmp_path, "stopped", config, ["TRAIN.ckpt_every_steps", every], **deterministic).succeeded()
    assert "resumed from" in resumed.out, resumed.out[-2000:]
    if DEVICE == "cuda":  # 312 steps; the 12 of a CPU rehearsal may not get there
        assert straight.last()["acc"] > 0.3, f"the uninterrupted run learnt nothing: {straight.last()}"
    a, b = straight.weights(), resumed.weights()
    distance = relative_distance(a, b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        f"{stopped_at}; resumed, it ends {distance:.2e} (relative) from the uninterrupted run's weights"
    assert resumed.last() == straight.last()


def test_compiled_sync_batchnorm_on_two_ranks_trains_like_eager(tmp_path):
    """The most fragile GPU path: dynamo rewrites SyncBatchNorm's all-reduce into functional collectives under
    inductor, inside DDP. Two ranks share the one GPU through gloo; fp32 with TF32 off. The compiled run must end
    within a tenth of the distance that separates the eager run from one with per-process BatchNorm."""
    within_budget(120)
    config = write_config(tmp_path, "cifar", 20, 10, mixed_precision="no", dist_backend="gloo")
    common = ["OPTIMIZER.lr", "0.01", "OPTIMIZER.momentum", "0.0"]  # a small step keeps fp32 noise from growing
    fp32 = {"NVIDIA_TF32_OVERRIDE": "0"}
    runs = {name: Run(tmp_path, name, config, [*common, *extra], prefix=(*TORCHRUN, "launch.py"), **fp32)
            for name, extra in [("eager", ["MODEL.sync_bn", "true"]),
                                ("compiled", ["MODEL.sync_bn", "true", "TRAIN.compile", "true"]),
                                ("per-process", ["MODEL.sync_bn", "false"])]}
    weights = {name: run.succeeded().weights() for name, run in runs.items()}
    compiled = relative_distance(weights["eager"], weights["compiled"])
    per_process = relative_distance(weights["eager"], weights["per-process"])
    assert compiled <= 1e-3 and compiled < 0.1 * per_process, \
        f"compiled SyncBatchNorm ends {compiled:.2e} from eager (per-process BatchNorm: {per_process:.2e})"


@pytest.mark.skipif(DEVICE == "cpu", reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_steady_state_training_steps_never_wait_for_the_device(tmp_path, monkeypatch):
    """CUDA's sync debug mode at "error" from the second epoch's first optimiser step (the first epoch compiles
    and autotunes) to each host read point (the sync point's rank_max, the loss read at log points), where it goes
    off until the next batch's augmentation: a synchronising call inside a step raises. Compiled bf16, in this
    process through bsdist.train.main."""
    from bsdist import config, trainer
    from bsdist.data.augment import BatchAugment
    from bsdist.tally import DeviceTally
    from bsdist.train import main
    within_budget(75)
    path = write_config(tmp_path, "cifar", 500, 10, epochs=2, compile=True, mixed_precision="bf16",
                        check_every_steps=20)
    cfg = config.validate(config.load(path, ["DEFAULT.savedir", str(tmp_path / "run")]))
    steps_per_epoch, counts, mode = 500 * 10 // 32, {"steps": 0, "checked": 0, "reads": 0}, ["default"]

    def switch(on: bool) -> None:
        mode[0] = "error" if on and counts["steps"] >= steps_per_epoch else "default"
        torch.cuda.set_sync_debug_mode(mode[0])

    def wrapped(function, before=None, after=None):
        def call(*args, **kwargs):
            if before:
                before()
            result = function(*args, **kwargs)
            if after:
                after()
            return result
        return call

    def stepped():
        counts["checked"] += mode[0] == "error"  # this step's forward and backward ran with the mode on
        counts["steps"] += 1
        switch(True)

    def read():
        counts["reads"] += 1
        switch(False)
    monkeypatch.setattr(trainer, "optimizer_step", wrapped(trainer.optimizer_step, after=stepped))
    monkeypatch.setattr(trainer, "rank_max", wrapped(trainer.rank_max, before=read))  # in Trainer.sync_point
    monkeypatch.setattr(DeviceTally, "read_loss", wrapped(DeviceTally.read_loss, before=read))
    monkeypatch.setattr(BatchAugment, "__call__", wrapped(BatchAugment.__call__, before=lambda: switch(True)))
    try:
        main(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts["checked"] >= steps_per_epoch - 1 and counts["reads"] > 0, counts  # the wrappers were called


@pytest.mark.skipif(DEVICE == "cpu", reason="NCCL needs CUDA")
def test_two_nccl_ranks_on_one_gpu_are_refused_in_one_line_and_gloo_shares_it(tmp_path):
    within_budget(40)
    config = write_config(tmp_path, "cifar", 20, 10)
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    one_gpu = dict(prefix=(*TORCHRUN, "launch.py"), CUDA_VISIBLE_DEVICES=first)
    refused = Run(tmp_path, "nccl", config, ["TRAIN.dist_backend", "auto"], **one_gpu).wait()
    shared = Run(tmp_path, "gloo", config, ["TRAIN.dist_backend", "gloo"], **one_gpu).succeeded()
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    # bsdist's own line (rank 0), not torchrun's failure summary, which repeats it per failed rank
    own = [line for line in refused.err.splitlines() if line.startswith("error: ") and "share one GPU" in line]
    assert refused.proc.returncode != 0 and len(own) == 1 and uuid in own[0], refused.err[-2000:]
    assert "2 process(es) on cuda" in shared.out, shared.out[-2000:]


@pytest.mark.skipif(DEVICE == "cpu", reason="moves a checkpoint from the GPU to the CPU")
def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    within_budget(40)
    config = write_config(tmp_path, "cifar", 500, 10, ckpt_every_steps=10)
    Run(tmp_path, "elsewhere", config).stop_at_first_checkpoint()
    resumed = Run(tmp_path, "elsewhere", config, ["TRAIN.device", "cpu"]).succeeded()
    assert "resumed from" in resumed.out and math.isfinite(resumed.last()["loss"]), resumed.out[-2000:]


@pytest.mark.skipif(DEVICE == "cpu", reason="fp16 autocast on a CPU is emulated and about 15x slower")
def test_compiled_fp16_with_grad_scaler_ends_finite(tmp_path):
    within_budget(75)
    config = write_config(tmp_path, "cifar", 500, 100, mixed_precision="fp16", compile=True)
    run = Run(tmp_path, "fp16", config).succeeded()
    rows = (run.run_dir / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[2]) for row in rows] + [run.last()["loss"]]
    assert rows and all(math.isfinite(x) for x in losses), losses


KINDS = {"grey": ("L", {}), "cmyk": ("CMYK", {}), "progressive": ("RGB", {"progressive": True}),
         "444": ("RGB", {"subsampling": 0}), "420": ("RGB", {"subsampling": 2})}
TRIALS = 50


def jpeg_files(folder, count: int) -> list[str]:
    """`count` photo-like JPEG files (500 x 375, quality 90: upsampled coarse noise) in folder; their paths."""
    from PIL import Image
    rng = np.random.RandomState(0)
    folder.mkdir()
    paths = [str(folder / f"{i}.jpg") for i in range(count)]
    for path in paths:
        low = rng.randint(0, 256, size=(12, 16, 3)).astype(np.uint8)
        Image.fromarray(low).resize((500, 375), Image.BICUBIC).save(path, quality=90)
    return paths


@pytest.mark.skipif(DEVICE == "cpu", reason="nvJPEG needs CUDA")
def test_both_jpeg_loaders_crop_every_kind_of_jpeg_within_rounding(tmp_path):
    """The workers' evaluation crop (libjpeg-turbo) against DATASET.loader device's (nvJPEG) of one picture saved as
    every kind of JPEG: rounding may differ, colours may not (at most 3 levels of 255 apart on average)."""
    from PIL import Image

    from bsdist.data.imagefiles import ImageFiles
    within_budget(15)
    (picture,) = jpeg_files(tmp_path / "picture", 1)
    names = [f"{kind}.jpg" for kind in KINDS]
    with Image.open(picture) as image:
        for name, (mode, options) in zip(names, KINDS.values()):
            image.convert(mode).save(tmp_path / name, quality=90, **options)
    targets, keys = np.zeros(len(names)), list(range(len(names)))
    workers = ImageFiles(str(tmp_path), names, targets, 224, False, seed=0).__getitems__(keys)[0]
    encoded = ImageFiles(str(tmp_path), names, targets, 224, False, seed=0, encoded=True)
    packed, _, keys = encoded.__getitems__(keys)
    on_device = encoded.decode_batch(packed, keys, torch.device("cuda")).cpu()
    levels = {kind: float((on_device[j].float() - workers[j].float()).abs().mean()) for j, kind in enumerate(KINDS)}
    assert max(levels.values()) <= 3.0, levels


def overwritten(fill, decode) -> int:
    """In how many of TRIALS trials `decode` wrote into memory the current (training) stream had freed but
    still read: each trial takes the tensors `fill` makes and their sums, queues a long kernel and then each
    tensor's sum again, frees the tensors, decodes, and compares the queued sums with the first ones."""
    bad = 0
    for _ in range(TRIALS):
        blocks = fill()
        expected = torch.stack([block.sum() for block in blocks])
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # the queued training step: the sums below wait behind it
        sums = torch.stack([block.sum() for block in blocks])
        del blocks  # freed while their sums are still queued
        images = decode()
        torch.cuda.synchronize()
        bad += int(not torch.equal(sums, expected))
        del images
    return bad


@pytest.mark.skipif(DEVICE == "cpu", reason="nvJPEG needs CUDA")
def test_decoding_on_the_device_overwrites_no_memory_the_training_stream_still_reads(tmp_path):
    """Blocks the training stream freed while its queued kernels still read them are not overwritten by
    decode_jpegs_on, nor are decoded images the training stream still reads once they are freed and the next
    batch is decoded. torchvision's own decode_jpeg, called with the training stream current, is counted
    beside it (pytorch/vision pull request 9606): when it overwrites nothing either, the trial proved little."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from bsdist.data.device_decoding import decode_jpegs_on
    within_budget(20)
    data, device = [read_file(path) for path in jpeg_files(tmp_path / "files", 16)], torch.device("cuda")
    numel = 3 * 375 * 500 // 4  # float32 blocks of one decoded image's bytes, so that the allocator reuses them

    def blocks():
        return [torch.full((numel,), float(k + 1), device=device) for k in range(8)]
    counts = {"bsdist": overwritten(blocks, lambda: decode_jpegs_on(data[:8], device)),
              "torchvision": overwritten(blocks, lambda: decode_jpeg(data[:8], mode=ImageReadMode.RGB, device=device)),
              "bsdist outputs": overwritten(lambda: decode_jpegs_on(data[:8], device),
                                            lambda: decode_jpegs_on(data[8:], device))}
    assert counts["bsdist"] == 0 and counts["bsdist outputs"] == 0, f"overwritten in trials of {TRIALS}: {counts}"
