"""Config loading, override parsing, validation messages, generated default.yaml, run naming."""

import glob
import os
import re

import pytest

from bsdist import config
from bsdist.config import changed_keys, default_yaml, load, run_dir, validate
from bsdist.errors import BsdistError
from paths import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def ok(overrides=(), path=None, world_size=1):
    return validate(load(path, list(overrides)), world_size=world_size)


def fails(overrides=(), path=None, world_size=1, cfg=None):
    with pytest.raises(BsdistError) as e:
        validate(cfg if cfg is not None else load(path, list(overrides)), world_size=world_size)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -------------------------------------------------------------------------------------------- load

def test_defaults_validate():
    cfg = ok()
    assert cfg.DATASET.name == "CIFAR10LT"
    assert cfg.DATASET.imbalance_factor == 100.0
    assert cfg.OPTIMIZER.lr == 0.1
    assert cfg.DEFAULT.exp_name == "BalancedSoftmax-exp-IF_100"


def test_load_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "DATASET:\n  name: CIFAR100LT\n  batch_size: 64\nOPTIMIZER:\n  lr: 0.5\n"
                           "SCHEDULER:\n  params:\n    eta_min: 0.001\n")
    raw = load(path, ["DATASET.datadir", "/datasets", "DEFAULT.exp_name", "null", "DATASET.aug_info", "[RandomCrop]",
                      "OPTIMIZER.lr", "1e-3", "SCHEDULER.params.t_mult", "2", "DATASET.batch_size", "128"])
    assert raw["DATASET"]["datadir"] == "/datasets"
    assert isinstance(raw["DATASET"]["datadir"], str)
    assert raw["DEFAULT"]["exp_name"] is None
    assert raw["DATASET"]["aug_info"] == ["RandomCrop"]
    assert raw["DATASET"]["name"] == "CIFAR100LT"  # from the file
    assert raw["DATASET"]["batch_size"] == 128  # override beats the file
    assert raw["SCHEDULER"]["params"]["eta_min"] == 0.001
    assert raw["SCHEDULER"]["params"]["t_mult"] == 2

    cfg = validate(raw)
    assert cfg.OPTIMIZER.lr == 0.001 and type(cfg.OPTIMIZER.lr) is float
    assert cfg.SCHEDULER.params.t_mult == 2.0 and type(cfg.SCHEDULER.params.t_mult) is float
    assert cfg.DATASET.batch_size == 128 and type(cfg.DATASET.batch_size) is int
    assert cfg.DATASET.datadir == "/datasets"
    assert cfg.DATASET.aug_info == ("RandomCrop",)  # a tuple: the validated config is immutable
    assert cfg.DEFAULT.exp_name == "BalancedSoftmax-exp-IF_100"
    # validate works on a copy
    assert raw["OPTIMIZER"]["lr"] == "1e-3" and raw["DEFAULT"]["exp_name"] is None


def test_load_without_file_or_overrides_is_defaults():
    assert load(None) == config.defaults()
    assert load(None, []) == config.defaults()


def test_empty_yaml_is_defaults(tmp_path):
    assert load(write(tmp_path, "# nothing\n")) == config.defaults()


def test_defaults_are_fresh_copies():
    a = load(None)
    a["DATASET"]["aug_info"].append("x")
    assert load(None)["DATASET"]["aug_info"] == ["RandomCrop", "RandomHorizontalFlip"]


# --------------------------------------------------------------------------------------------- errors

def test_unknown_override_key_suggests():
    with pytest.raises(BsdistError, match=r"TRAIN\.epoch\b.*did you mean TRAIN\.epochs\?") as e:
        load(None, ["TRAIN.epoch", "10"])
    assert "\n" not in str(e.value)


def test_unknown_override_without_near_key():
    with pytest.raises(BsdistError, match=r"unknown config key ZZZ\.qqq"):
        load(None, ["ZZZ.qqq", "1"])


@pytest.mark.parametrize("text, key", [("TRAIN:\n  epochz: 3\n", "TRAIN.epochz"),
                                       ("TRAINING:\n  epochs: 3\n", "TRAINING"),
                                       ("SCHEDULER:\n  params:\n    t_multi: 2\n", "SCHEDULER.params.t_multi"),
                                       ("SCHEDULER:\n  t_mult: 2\n", "SCHEDULER.t_mult")])
def test_unknown_key_in_yaml(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(BsdistError, match="unknown config key " + re.escape(key)) as e:
        load(path)
    assert "\n" not in str(e.value)


def test_yaml_suggests_near_key(tmp_path):
    with pytest.raises(BsdistError, match=r"TRAIN\.epoch\b.*did you mean TRAIN\.epochs\?"):
        load(write(tmp_path, "TRAIN:\n  epoch: 3\n"))


def test_mapping_under_a_leaf_key_is_rejected(tmp_path):
    msg = fails(path=write(tmp_path, "DATASET:\n  name:\n    x: 1\n"))
    assert "DATASET.name" in msg


def test_yaml_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(BsdistError, match="must be a mapping") as e:
        load(path)
    assert path in str(e.value)


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(BsdistError) as e:
        load(path)
    assert path in str(e.value) and "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "DATASET:\n  name: [CIFAR10LT\n  lr: 1\n")
    with pytest.raises(BsdistError) as e:
        load(path)
    assert path in str(e.value) and "not valid YAML" in str(e.value) and "\n" not in str(e.value)


def test_odd_number_of_override_tokens():
    with pytest.raises(BsdistError, match=r"DATASET\.batch_size.*pairs") as e:
        load(None, ["TRAIN.epochs", "3", "DATASET.batch_size"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, pattern", [
    (["TRAIN.epochs", "ten"], r"TRAIN\.epochs must be .*int.*'ten'"),
    (["TRAIN.epochs", "2.5"], r"TRAIN\.epochs"),
    (["TRAIN.epochs", "true"], r"TRAIN\.epochs"),
    (["DATASET.batch_size", "null"], r"DATASET\.batch_size may not be null"),
    (["OPTIMIZER.lr", "-0.1"], r"OPTIMIZER\.lr must be > 0"),
    (["OPTIMIZER.lr", "0"], r"OPTIMIZER\.lr"),
    (["OPTIMIZER.lr", "fast"], r"OPTIMIZER\.lr"),
    (["OPTIMIZER.lr", ".inf"], r"OPTIMIZER\.lr"),
    (["OPTIMIZER.momentum", "1"], r"OPTIMIZER\.momentum"),
    (["DATASET.imbalance_factor", "0.5"], r"DATASET\.imbalance_factor must be >= 1"),
    (["DATASET.name", "CIFAR10"],
     r"DATASET\.name must be one of CIFAR10LT, CIFAR100LT, DigitsLT.*did you mean CIFAR10LT"),
    (["DATASET.name", "ImageNet"], r"DATASET\.name must be one of .*ImageNetLT.*did you mean ImageNetLT"),
    (["LOSS.name", "NoSuchLoss"], r"LOSS\.name must be one of CrossEntropyLoss, BalancedSoftmax"),
    (["MODEL.name", "resnet51"], r"MODEL\.name must be one of .*resnet18.*'resnet51'"),
    (["SCHEDULER.sched_name", "linear"], r"SCHEDULER\.sched_name must be one of cosine_annealing, multistep"),
    (["OPTIMIZER.nesterov", "true"], r"OPTIMIZER\.nesterov.*OPTIMIZER\.momentum"),
    (["SCHEDULER.params.warmup_epochs", "50"], r"SCHEDULER\.params\.warmup_epochs.*TRAIN\.epochs"),
    (["SCHEDULER.params.warmup_epochs", "60"], r"SCHEDULER\.params\.warmup_epochs"),
    (["SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[30, 20]"],
     r"SCHEDULER\.params\.milestones"),
    (["SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[10, 50]"],
     r"SCHEDULER\.params\.milestones"),
    (["SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[0, 10]"],
     r"SCHEDULER\.params\.milestones"),
    (["SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[10, 10]"],
     r"SCHEDULER\.params\.milestones"),
    (["SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[10.5]"],
     r"SCHEDULER\.params\.milestones"),
    (["SCHEDULER.params.milestones", "[10, 20]"], r"SCHEDULER\.params\.milestones.*multistep"),
    (["SCHEDULER.params.milestones", "10"], r"SCHEDULER\.params\.milestones"),
    (["TRAIN.mixed_precision", "fp8"], r"TRAIN\.mixed_precision must be one of auto, fp16, bf16, no.*'fp8'"),
    (["DATASET.aug_info", "[RandomCrop, ColorJitter]"], r"DATASET\.aug_info.*'ColorJitter'"),
    (["DATASET.aug_info", "[RandomCrop, RandomCrop]"], r"DATASET\.aug_info"),
    (["DATASET.aug_info", "RandomCrop"], r"DATASET\.aug_info"),
    (["DATASET.imbalance_type", "null", "DATASET.imbalance_factor", "10"],
     r"DATASET\.imbalance_type null.*imbalance_factor"),
    (["DATASET.imbalance_type", "linear"], r"DATASET\.imbalance_type"),
    (["DATASET.val_per_cls", "-1"], r"DATASET\.val_per_cls"),
    (["DEFAULT.seed", "-3"], r"DEFAULT\.seed"),
    (["TRAIN.compile", "maybe"], r"TRAIN\.compile must be true, false or auto"),
    (["TRAIN.ddp_bucket_mb", "0.5"], r"TRAIN\.ddp_bucket_mb must be >= 1, got 0\.5"),
    (["DATASET.download", "auto"], r"DATASET\.download must be a bool"),
    (["TRAIN.device", "tpu"], r"TRAIN\.device"),
    (["MODEL.sync_bn", "maybe"], r"MODEL\.sync_bn must be true, false or auto"),
    (["MODEL.sync_bn_batch", "0"], r"MODEL\.sync_bn_batch must be > 0"),
    (["TRAIN.dist_backend", "mpi"], r"TRAIN\.dist_backend must be one of auto, gloo"),
    (["DEFAULT.exp_name", "a/b"], r"DEFAULT\.exp_name 'a/b'"),
    (["DEFAULT.exp_name", "'..'"], r"DEFAULT\.exp_name"),
    (["DEFAULT.exp_name", "''"], r"DEFAULT\.exp_name"),
])
def test_validation_errors_name_the_key(overrides, pattern):
    msg = fails(overrides)
    assert re.search(pattern, msg), msg


def test_resume_string_yes_rejected():
    cfg = load(None)
    cfg["TRAIN"]["resume"] = "yes"
    msg = fails(cfg=cfg)
    assert "TRAIN.resume must be true, false or auto" in msg and "'yes'" in msg


def test_resume_quoted_yes_in_yaml_rejected(tmp_path):
    msg = fails(path=write(tmp_path, 'TRAIN:\n  resume: "yes"\n'))
    assert "TRAIN.resume" in msg


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_resume_values(value, expected):
    assert ok(["TRAIN.resume", value]).TRAIN.resume == expected


@pytest.mark.parametrize("text", ["no", "'no'", "fp16", "bf16"])
def test_mixed_precision_override_values(text):
    # YAML 1.1 reads a bare `no` as false; the choice still means the string "no"
    assert ok(["TRAIN.mixed_precision", text]).TRAIN.mixed_precision == text.strip("'")


def test_batch_size_must_divide_by_world_size():
    msg = fails(["DATASET.batch_size", "32"], world_size=3)
    assert "DATASET.batch_size 32" in msg and "3" in msg
    assert ok(["DATASET.batch_size", "33"], world_size=3).DATASET.batch_size == 33
    assert ok(["DATASET.batch_size", "32"], world_size=4).DATASET.batch_size == 32


def test_valid_cross_key_settings():
    cfg = ok(["OPTIMIZER.nesterov", "true", "OPTIMIZER.momentum", "0.9",
              "SCHEDULER.sched_name", "multistep", "SCHEDULER.params.milestones", "[10, 40]",
              "SCHEDULER.params.warmup_epochs", "49.5", "DATASET.imbalance_type", "null",
              "DATASET.imbalance_factor", "1", "TRAIN.mixed_precision", "'no'"])
    assert cfg.SCHEDULER.params.milestones == (10, 40)
    assert cfg.TRAIN.mixed_precision == "no"
    assert cfg.DEFAULT.exp_name == "BalancedSoftmax-balanced-IF_1"


# -------------------------------------------------------------------------------- generated/shipped files

def test_default_yaml_in_sync():
    with open(os.path.join(ROOT, "configs", "default.yaml")) as f:
        assert f.read() == default_yaml()
    assert load(os.path.join(ROOT, "configs", "default.yaml")) == config.defaults()


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"default.yaml", "demo.yaml", "cifar10lt_bs.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_validate(path):
    cfg = validate(load(path))
    assert cfg.DATASET.name in config.FIELDS["DATASET.name"].choices
    assert cfg.DEFAULT.exp_name


def test_demo_config_values():
    cfg = validate(load(os.path.join(ROOT, "configs", "demo.yaml")))
    assert cfg.DATASET.name == "DigitsLT"
    assert cfg.DATASET.aug_info == ("RandomCrop",)
    assert cfg.TRAIN.mixed_precision == "no"
    assert cfg.DEFAULT.exp_name == "BalancedSoftmax-exp-IF_10"


# -------------------------------------------------------------------------------------------- naming

@pytest.mark.parametrize("overrides, name", [
    ([], "BalancedSoftmax-exp-IF_100"),
    (["LOSS.name", "CrossEntropyLoss", "DATASET.imbalance_type", "step", "DATASET.imbalance_factor", "10"],
     "CrossEntropyLoss-step-IF_10"),
    (["DATASET.imbalance_factor", "50.5"], "BalancedSoftmax-exp-IF_50.5"),
    (["DEFAULT.exp_name", "mine"], "mine"),
])
def test_default_exp_name(overrides, name):
    assert ok(overrides).DEFAULT.exp_name == name


def test_run_dir():
    cfg = ok(["DEFAULT.savedir", "/runs", "DATASET.name", "CIFAR100LT", "LOSS.name", "CrossEntropyLoss"])
    assert run_dir(cfg) == os.path.join("/runs", "CIFAR100LT", "resnet18", "CrossEntropyLoss-exp-IF_100")


def test_exp_name_with_slash_rejected():
    msg = fails(["DEFAULT.exp_name", "runs/one"])
    assert "DEFAULT.exp_name" in msg and "runs/one" in msg
    assert "DEFAULT.exp_name" in fails(["DEFAULT.exp_name", "runs\\one"])


# ------------------------------------------------------------------------------------------ changed_keys

def test_changed_keys():
    base = ok(["DEFAULT.exp_name", "run"])
    assert changed_keys(base, base) == []
    same = ok(["DEFAULT.exp_name", "run", "TRAIN.resume", "auto", "TRAIN.log_interval", "3"])
    assert changed_keys(base, same) == []
    diff = ok(["DEFAULT.exp_name", "run", "DATASET.imbalance_factor", "50", "TRAIN.resume", "auto"])
    assert changed_keys(base, diff) == ["DATASET.imbalance_factor"]
    two = ok(["DEFAULT.exp_name", "run", "OPTIMIZER.lr", "0.2", "DATASET.num_workers", "0", "TRAIN.epochs", "10"])
    assert changed_keys(base, two) == ["OPTIMIZER.lr", "TRAIN.epochs"]


@pytest.mark.parametrize("overrides, world_size, expected, reason", [
    ([], 1, False, "one process"),
    (["DATASET.batch_size", "32"], 8, True, "4 images per process is below MODEL.sync_bn_batch 32"),
    (["DATASET.batch_size", "512"], 8, False, "64 images per process"),
    (["DATASET.batch_size", "512", "MODEL.sync_bn", "true"], 8, True, "MODEL.sync_bn true"),
    (["DATASET.batch_size", "32", "MODEL.sync_bn", "false"], 8, False, "MODEL.sync_bn false"),
])
def test_batchnorm_synchronises_when_each_process_holds_a_small_batch(overrides, world_size, expected, reason):
    cfg = config.validate(load(None, overrides), world_size)
    synced, why = config.resolve_sync_bn(cfg, world_size)
    assert synced is expected and reason in why


def test_a_node_with_gpus_that_cuda_cannot_see_refuses_to_train_on_cpu(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "null").touch()
    assert config.gpus_expected(str(tmp_path)) is None
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    assert config.gpus_expected(str(tmp_path)) == str(tmp_path / "nvidia0")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")  # --slurm --gpus-per-node 4
    assert config.gpus_expected("/nonexistent") == "SLURM_GPUS_ON_NODE=4"
    with pytest.raises(BsdistError, match="SLURM_GPUS_ON_NODE=4.*CUDA cannot use them.*TRAIN.device cpu"):
        config.resolve_device("auto")
    assert config.resolve_device("cpu") == "cpu"
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    monkeypatch.setattr(config.device, "gpus_expected", lambda dev="/dev": None)
    assert config.resolve_device("auto") == "cpu"


# ------------------------------------------------------------------------------------------ registries

def test_every_registry_holds_exactly_the_names_the_schema_declares():
    from bsdist.config import schema
    from bsdist.data.datasets import ARRAY_DATASETS
    from bsdist.data.imagelist import FILE_DATASETS
    from bsdist.losses import LOSSES
    from bsdist.models.heads import HEADS
    from bsdist.models.zoo import MODELS
    own_models = [name for name, build in MODELS.items() if build.__module__.startswith("bsdist.")]  # not tiny_model's
    assert (tuple(ARRAY_DATASETS), FILE_DATASETS, tuple(LOSSES), tuple(own_models), tuple(HEADS)) == (
        schema.ARRAY_DATASET_NAMES, schema.FILE_DATASET_NAMES, schema.LOSS_NAMES, schema.MODEL_NAMES,
        schema.HEAD_NAMES)
    with pytest.raises(BsdistError, match=r"^bsdist.losses.LOSSES holds CrossEntropyLoss, .*FocalLoss, Other but "
                                          r"bsdist/config/names.py declares CrossEntropyLoss, .*FocalLoss; declare "
                                          r"each name in both, in the same order$"):
        schema.check_registry("bsdist.losses.LOSSES", [*LOSSES, "Other"], schema.LOSS_NAMES)


def test_validation_imports_no_registry():
    """config sits below data, losses and models: validating a config loads none of them."""
    import subprocess
    import sys
    code = ("import sys; from bsdist import config; config.validate(config.load(None, ['DATASET.name', 'ImageNetLT', "
            "'DATASET.datadir', '.'])); print(sorted(m for m in sys.modules if m.startswith('bsdist.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # a list of module names
    assert [m for m in loaded if not m.startswith("bsdist.config.sections.")] == sorted(
        ["bsdist.config", "bsdist.config.device", "bsdist.config.fields", "bsdist.config.loading",
         "bsdist.config.names", "bsdist.config.schema", "bsdist.config.sections", "bsdist.config.validation",
         "bsdist.errors"])


# recipes copied from a paper live in the folder of their source (configs/<source>/); configs/sweeps holds sweeps
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
                 if os.path.basename(os.path.dirname(p)) != "sweeps")


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_every_recipe_in_a_source_s_folder_validates(path):
    validate(load(path))


@pytest.mark.parametrize("dataset", ["cifar10lt", "cifar100lt"])
def test_the_ldam_drw_recipe_decays_the_learning_rate_where_cifar_train_py_does(dataset):
    """adjust_learning_rate (kaidic/LDAM-DRW cifar_train.py lines 366-378): lr through epoch 160 after the
    warmup, x 0.01 from epoch 160 (counted from 0), x 0.0001 from 180."""
    from bsdist.optim import LRFactor
    cfg = validate(load(os.path.join(ROOT, "configs", "ldam_drw", f"{dataset}_ldam_drw.yaml")))
    factor, steps = LRFactor(cfg, 100), 100
    assert factor(5 * steps - 1) == 1.0 and factor(160 * steps - 1) == 1.0
    assert factor(160 * steps) == pytest.approx(0.01) and factor(180 * steps - 1) == pytest.approx(0.01)
    assert factor(180 * steps) == pytest.approx(1e-4) and factor(200 * steps - 1) == pytest.approx(1e-4)
    assert (cfg.LOSS.name, cfg.LOSS.drw_epoch, cfg.LOSS.beta, cfg.MODEL.classifier) == ("LDAMLoss", 160, 0.9999,
                                                                                       "cosine")


def test_loss_drw_epoch_null_never_re_weights_and_is_accepted():
    assert validate(load(None, ["LOSS.drw_epoch", "null"])).LOSS.drw_epoch is None
