"""A catalogue of realistic mistakes, each through the real command line (bsdist.cli.run, in process).

Each must end with exit status 2 and one line on stderr naming the problem and the fix, create no
run directory, and leave an existing run untouched.
"""

import os

import pytest
import torch

import tiny_model
from bsdist import checkpoint
from bsdist.cli import run
from cifar_files import write_cifar
from runs import snapshot
from paths import ROOT

tiny_model.register()
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
FAST = ["TRAIN.epochs", "1", "SCHEDULER.params.warmup_epochs", "0", "TRAIN.device", "cpu", "TRAIN.compile", "false"]


def broken_cifar(tmp_path, damage):
    root = write_cifar(str(tmp_path / "data"), 10, train_per_class=20)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    if damage == "truncated":
        with open(path, "rb") as f:
            head = f.read(500)
        with open(path, "wb") as f:
            f.write(head)
    else:
        with open(path, "wb") as f:
            f.write(os.urandom(4000))
    return ["DATASET.name", "CIFAR10LT", "DATASET.datadir", root, "DATASET.imbalance_factor", "1",
            "DATASET.crop_padding", "4"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (config file or None for demo, overrides, substring of the one error line)
CASES = {
    "unknown key": (None, ["TRAIN.warmup", "5"], "unknown config key TRAIN.warmup"),
    "typo of a key": (None, ["OPTIMIZER.weight_decy", "0.1"], "did you mean OPTIMIZER.weight_decay?"),
    "wrong type": (None, ["TRAIN.epochs", "ten"], "TRAIN.epochs must be an int, got 'ten'"),
    "negative learning rate": (None, ["OPTIMIZER.lr", "-0.1"], "OPTIMIZER.lr must be > 0"),
    "imbalance factor below 1": (None, ["DATASET.imbalance_factor", "0.5"], "DATASET.imbalance_factor must be >= 1"),
    "unknown dataset": (None, ["DATASET.name", "CIFAR10"],
                        "DATASET.name must be one of CIFAR10LT, CIFAR100LT, DigitsLT, ImageList, ImageNetLT, PlacesLT, "
                        "iNat2018, got 'CIFAR10'; did you mean CIFAR10LT?"),
    "unknown loss": (None, ["LOSS.name", "NoSuchLoss"], "LOSS.name must be one of"),
    "unknown model": (None, ["MODEL.name", "resnet51"], "MODEL.name must be one of"),
    "unknown optimiser": (None, ["OPTIMIZER.name", "Adam"], "OPTIMIZER.name must be one of SGD"),
    "unknown scheduler": (None, ["SCHEDULER.sched_name", "cosine"], "did you mean cosine_annealing?"),
    "unknown augmentation": (None, ["DATASET.aug_info", "[RandomCrop, ColorJitter]"], "unknown entry 'ColorJitter'"),
    "odd number of override tokens": (None, ["TRAIN.epochs"], "override TRAIN.epochs has no value"),
    "missing config file": ("missing.yaml", [], "config file missing.yaml does not exist"),
    "nesterov without momentum": (None, ["OPTIMIZER.nesterov", "true", "OPTIMIZER.momentum", "0"],
                                  "nesterov needs OPTIMIZER.momentum > 0"),
    "warmup as long as training": (None, ["SCHEDULER.params.warmup_epochs", "15"],
                                   "warmup_epochs 15.0 must be below TRAIN.epochs"),
    "milestones past the end": (None, ["SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[5, 40]"],
                                "milestones must be increasing"),
    "balanced type with a factor": (None, ["DATASET.imbalance_type", "null"],
                                    "imbalance_type null keeps every training image"),
    "imbalance factor that empties a class": (None, ["DATASET.imbalance_factor", "500"],
                                              "leaves class 7 with no training image (img_max 100); "
                                              "use DATASET.imbalance_factor <= 100"),
    "validation split larger than a class": (None, ["DATASET.val_per_cls", "200"],
                                             "DATASET.val_per_cls 200 leaves no training image"),
    "batch larger than the training set": (None, ["DATASET.batch_size", "4096"],
                                           "fewer than one batch of 4096; lower DATASET.batch_size"),
    "agreement never read": (None, ["TRAIN.check_every_steps", "0"], "TRAIN.check_every_steps must be >= 1, got 0"),
    "CUDA without a GPU": (None, ["TRAIN.device", "cuda"], "TRAIN.device cuda but no CUDA device is visible"),
    "experiment name with a slash": (None, ["DEFAULT.exp_name", "a/b"], "must be a plain directory name"),
    "missing data directory without download": (None, ["DATASET.name", "CIFAR10LT", "DATASET.datadir", "/nonexistent"],
                                                "CIFAR10LT data not found: /nonexistent/cifar-10-batches-py lacks"),
}


def run_cli(capsys, config_path, overrides):
    code = run([config_path, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_is_one_line_and_creates_nothing(case, tmp_path, capsys, monkeypatch):
    config_path, overrides, message = CASES[case]
    if config_path is not None:
        monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, config_path or DEMO, [*FAST, "DEFAULT.savedir", str(tmp_path / "runs"), *overrides])
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_invalid_yaml(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", "TRAIN: {epochs: 3\n")
    code, err = run_cli(capsys, path, [])
    assert code == 2 and len(err) == 1 and "is not valid YAML" in err[0]


def test_batch_not_divisible_by_the_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run_cli(capsys, DEMO, [*FAST, "DEFAULT.savedir", str(tmp_path / "runs")])
    assert code == 2 and err == ["error: DATASET.batch_size 64 does not divide by the 3 processes; use a multiple of 3"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_cifar_batch_is_named(tmp_path, capsys, damage):
    code, err = run_cli(capsys, DEMO, [*FAST, "DEFAULT.savedir", str(tmp_path / "runs"), "MODEL.name", "tiny",
                                       *broken_cifar(tmp_path, damage)])
    assert (code == 2 and len(err) == 1 and "data_batch_3 is not a readable CIFAR batch" in err[0]
            and "download it again" in err[0])
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_run_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(capsys, DEMO, [*FAST, "MODEL.name", "tiny", "DEFAULT.savedir", str(tmp_path / "file" / "runs")])
    assert code == 2 and len(err) == 1 and "cannot be written" in err[0]


@pytest.fixture
def finished_run(tmp_path, capsys):
    args = [*FAST, "MODEL.name", "tiny", "DEFAULT.savedir", str(tmp_path / "runs"), "DEFAULT.exp_name", "run"]
    assert run([DEMO, *args]) == 0
    capsys.readouterr()
    return args, str(tmp_path / "runs" / "DigitsLT" / "tiny" / "run")


def test_a_finished_run_is_not_overwritten(finished_run, capsys):
    args, directory = finished_run
    before = snapshot(directory)
    code, err = run_cli(capsys, DEMO, args)
    assert code == 2 and len(err) == 1 and "already holds a run" in err[0] and "TRAIN.resume auto" in err[0]
    assert snapshot(directory) == before


def test_resume_with_another_loss_is_refused(finished_run, capsys):
    args, directory = finished_run
    before = snapshot(directory)
    code, err = run_cli(capsys, DEMO, [*args, "TRAIN.resume", "auto", "LOSS.name", "CrossEntropyLoss"])
    assert code == 2 and len(err) == 1 and "LOSS.name differ from the saved config.yaml" in err[0]
    assert snapshot(directory) == before


def test_a_checkpoint_from_another_model_is_refused(finished_run, capsys):
    args, directory = finished_run
    path = os.path.join(directory, "last.pt")
    state = checkpoint.load(path)
    state["model"]["4.weight"] = torch.zeros(100, 32)  # another number of classes
    checkpoint.save_atomic(state, path)
    os.remove(os.path.join(directory, "results.json"))  # unfinished: resume will load last.pt
    before = snapshot(directory)
    code, err = run_cli(capsys, DEMO, [*args, "TRAIN.resume", "auto"])
    assert code == 2 and len(err) == 1 and "does not fit this model" in err[0] and "size mismatch" in err[0]
    assert snapshot(directory) == before


def test_debug_prints_the_traceback(tmp_path, capsys):
    assert run([DEMO, "TRAIN.epoch", "3", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_error_quoting_a_multi_line_exception_is_still_one_line():
    from bsdist.errors import BsdistError, Stopped
    assert str(BsdistError("file x is not readable (UnpicklingError: bad\nbytes\r\nhere); delete it")) == \
        "file x is not readable (UnpicklingError: bad bytes here); delete it"
    assert str(Stopped("stopped\nby signal 15", 15)) == "stopped by signal 15" and Stopped("s", 15).exit_code == 143
