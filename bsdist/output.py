"""Rank 0's side effects in one place: run directory, console and log.txt, TensorBoard, metrics.csv,
config.yaml, checkpoints and results.json. Other ranks get `NullOutput`, which does nothing, so the
training code never asks which rank it is on.

Console lines go through the `bsdist` logger: `console(rank)` lets rank 0's through (the others would
repeat them), and a run's log.txt is a handler on the same logger, so the file holds what the console
showed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys

from bsdist import checkpoint, config
from bsdist.atomic import remove_orphans, write_atomic, write_text
from bsdist.config import Config, dump
from bsdist.distributed import DistEnv
from bsdist.errors import BsdistError
from bsdist.metrics import CONFUSION_CLASSES, FEW_SHOT, MANY_SHOT, shot_groups
from bsdist.plots import MAX_HEATMAP_CLASSES, class_figure, reliability_figure, save

SCALARS = ("acc", "bcr", "loss", "many", "medium", "few", "ece")  # an evaluation's loss is its NLL
BEST = ("bcr", "acc", "many", "medium", "few", "epoch")  # of the selected model (best.pt), in TensorBoard's test/best_*
# TensorBoard's Time Series page opens the first two tag groups (by name) and folds the rest, so every
# tag sits under test/, train/ or val/: test (the selected model's test figures, test/best_*, among
# them) and train open, val folded; per-class curves stay inside their split's group.
# The settings in TensorBoard's hparams table. It sorts them by name and shows the first five unless asked
# for more, so the five that tell runs apart are the five that sort first; the rest are a click away.
HPARAMS = ("DATASET.imbalance_factor", "DATASET.name", "DEFAULT.seed", "LOSS.name", "OPTIMIZER.lr",
           "OPTIMIZER.weight_decay", "SCHEDULER.sched_name", "TRAIN.epochs", "TRAIN.mixed_precision")


LOG = logging.getLogger("bsdist")
LINE = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")


class RankFilter(logging.Filter):
    """Rank 0's lines, except those the launcher prints itself (logged with console=False: log.txt only)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 and getattr(record, "console", True)


class _Console(logging.Handler):
    """Lines to sys.stdout, warnings to sys.stderr: the streams there are when a line is logged (pytest and
    redirections swap them)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def console(rank: int = 0) -> logging.Logger:
    """The `bsdist` logger, with this process's console handler (one, whatever the calls) filtered for `rank`."""
    handler = next((h for h in LOG.handlers if isinstance(h, _Console)), None)
    if handler is None:
        handler = _Console()
        handler.setFormatter(LINE)
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False  # the root logger (a user's, or pytest's) does not print them twice
    handler.filters = [RankFilter(rank)]
    return LOG


console(int(os.environ.get("RANK", "0")))  # a launcher's RANK until a process group says (make_output)


class NullOutput:
    """What every rank but 0 writes: nothing. It has exactly RunOutput's public methods (filled in below
    RunOutput), so a misspelt call fails on every rank, not only on rank 0."""

    def checkpoint_failed(self) -> bool:
        return False


class RunOutput:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.writer = None
        self.log_file: logging.Handler | None = None
        self.checkpoints = checkpoint.CheckpointWriter()

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def start(self, cfg: Config, resumed_step: int | None, resumed_epoch: int, checkpoint_bytes: int) -> None:
        """Create the run directory and its writers; on resume drop what came after the checkpoint.

        Stops first if the directory cannot be written or lacks room for three checkpoints: last.pt, the
        one before it kept as last.prev.pt, and best.pt when it is another file (the atomic write of the
        next last.pt takes the room last.prev.pt frees).
        """
        from torch.utils.tensorboard import SummaryWriter
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            self.log_file = logging.FileHandler(self.path("log.txt"), "a")
        except OSError as e:
            raise BsdistError(f"run directory {self.run_dir} cannot be written ({e.strerror}); "
                              "set DEFAULT.savedir to a writable directory") from None
        self.log_file.setFormatter(LINE)
        LOG.addHandler(self.log_file)
        orphans = remove_orphans(self.run_dir)
        if orphans:
            self.info(f"removed {', '.join(orphans)}: what remained of a checkpoint write cut short")
        free = shutil.disk_usage(self.run_dir).free
        if free < 3 * checkpoint_bytes:
            raise BsdistError(f"{self.run_dir} has {free / 2**20:.0f} MiB free, less than the "
                              f"{3 * checkpoint_bytes / 2**20:.0f} MiB three checkpoints need (last.pt, last.prev.pt, "
                              "best.pt); free space or set DEFAULT.savedir elsewhere")
        write_text(self.path("config.yaml"), dump(cfg))
        self._truncate_csv(resumed_epoch)
        # purge_step hides events an earlier attempt logged after the checkpoint (all of them when starting afresh)
        self.writer = SummaryWriter(self.run_dir, purge_step=0 if resumed_step is None else resumed_step + 1)
        if resumed_step is None:
            self._hparams(cfg)
            self._layout(["val", "test"] if cfg.DATASET.val_per_cls else ["test"])

    def info(self, message: str, console: bool = True) -> None:
        """A line for the console and the run's log.txt (console=False: the launcher prints it itself)."""
        LOG.info(message, extra={"console": console})

    def scalars(self, values: dict, step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def classes(self, num_per_cls: list[int], class_names: list[str] | None, step: int) -> None:
        """What the pictures and per-class curves name; a text summary of the training counts per class."""
        self.num_per_cls = num_per_cls
        self.class_names = class_names or [str(c) for c in range(len(num_per_cls))]
        if step > 0:
            return  # a resumed run: the summary was written when it started
        groups = shot_groups(num_per_cls)
        rows = ["| class | training images | shot |", "| --- | ---: | --- |"]
        shot = {c: g for g, members in groups.items() for c in members}
        rows += [f"| {self._label(c)} | {n} | {shot[c]} |" for c, n in enumerate(num_per_cls)]
        self.writer.add_text("classes", f"{len(num_per_cls)} classes, {sum(num_per_cls)} training images. Classes by "
                             f"training images: many-shot (more than {MANY_SHOT}) {len(groups['many'])}, medium "
                             f"({FEW_SHOT} to {MANY_SHOT}) {len(groups['medium'])}, few (fewer than {FEW_SHOT}) "
                             f"{len(groups['few'])}.\n\n"
                             + "\n".join(rows), step)

    def _label(self, c: int) -> str:
        """`003 cat` where the class has a name, `003` where its name is its index (zero-padded, so tags sort)."""
        name = self.class_names[c]
        return f"{c:03d} {name}" if name != str(c) else f"{c:03d}"

    def eval_metrics(self, split: str, metrics: dict, step: int) -> None:
        self.scalars({f"{split}/{k}": metrics[k] for k in SCALARS}, step)
        if len(self.num_per_cls) <= CONFUSION_CLASSES:  # beyond, one curve per class is noise: the picture shows them
            for c, recall in enumerate(metrics["per_class_recall"]):
                if recall is not None:
                    self.writer.add_scalar(f"{split}/recall/{self._label(c)}", recall, step)
        heatmap = len(self.num_per_cls) <= MAX_HEATMAP_CLASSES
        figure = class_figure(metrics, self.num_per_cls, self.class_names,
                              f"{split} {'confusion' if heatmap else 'recall by class'}, step {step}")
        self.writer.add_figure(f"{split}/{'confusion' if heatmap else 'recall_by_class'}", figure, step)
        self.writer.add_figure(f"{split}/reliability",
                               reliability_figure(metrics["calibration"], f"{split} reliability, step {step}"), step)


    def epoch_row(self, row: dict) -> None:
        path = self.path("metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.writer.flush()

    def save_checkpoint(self, state: dict, names: list[str]) -> None:
        """Write state to each named file in the run directory, in the background (checkpoint.CheckpointWriter)."""
        self.checkpoints.save(state, [self.path(n) for n in names])

    def checkpoint_failed(self) -> bool:
        return self.checkpoints.error is not None

    def wait_for_checkpoints(self, raise_error: bool = True) -> None:
        """Until every checkpoint handed over is on disk; raises the first failed write."""
        self.checkpoints.wait(raise_error)

    def results(self, results: dict) -> None:
        """results.json, and reliability.png: the test calibration of the selected model."""
        best = results["best"]
        title = f"test reliability of the selected model (epoch {best['epoch']})"
        save(reliability_figure(best["calibration"], title), self.path("reliability.png"))
        self.write_json("results.json", results)

    def write_json(self, name: str, content: dict) -> None:
        """A JSON file in the run directory, written atomically."""
        write_text(self.path(name), json.dumps(content, indent=2))

    def close(self) -> None:
        self.checkpoints.wait(raise_error=False)  # a write under way finishes, even when the run failed
        if self.writer:
            self.writer.close()
        if self.log_file:
            LOG.removeHandler(self.log_file)
            self.log_file.close()

    def _truncate_csv(self, keep_epochs: int) -> None:
        """metrics.csv with only the epochs up to keep_epochs: a resumed run writes the later ones again."""
        path = self.path("metrics.csv")
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, fieldnames = list(reader), reader.fieldnames
        kept = [r for r in rows if int(r["epoch"]) <= keep_epochs]
        if len(kept) == len(rows):
            return

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        write_atomic(path, write)

    def _layout(self, splits: list[str]) -> None:
        """TensorBoard's CUSTOM SCALARS page: the curves read together on one chart each."""
        charts = {"loss": ["Multiline", ["train/loss", *[f"{s}/loss" for s in splits]]],
                  "accuracy and bcr": ["Multiline",
                                       ["train/acc", *[f"{s}/{m}" for s in splits for m in ("acc", "bcr")]]]}
        charts.update({f"{s}: many / medium / few-shot recall": ["Multiline", [f"{s}/many", f"{s}/medium", f"{s}/few"]]
                       for s in splits})
        charts["expected calibration error"] = ["Multiline", [f"{s}/ece" for s in splits]]
        self.writer.add_custom_scalars({"bsdist": charts})

    def _hparams(self, cfg: Config) -> None:
        """The settings that tell runs apart (HPARAMS) with their domains, and the metrics of the selected
        model (test/best_*) and of the last epoch's splits."""
        from torch.utils.tensorboard.summary import hparams
        values, domains = {}, {}
        for key in HPARAMS:
            value, f = config.get(cfg, key), config.FIELDS[key]
            if f.kind in ("bool", "auto_bool") or value is None:
                value = str(value).lower()  # true / false / auto / none, not 1 / 0
                domains[key] = ["false", "true"] + (["auto"] if f.kind == "auto_bool" else [])
            elif f.kind == "choice":
                domains[key] = [str(c) for c in f.choices] + (["none"] if f.nullable else [])
            values[key] = value if isinstance(value, (int, float, str)) else str(value)
        splits = ["val", "test"] if cfg.DATASET.val_per_cls else ["test"]
        metrics = {f"test/best_{m}": 0.0 for m in BEST}
        metrics.update({f"{split}/{m}": 0.0 for split in splits for m in ("acc", "bcr")})
        for summary in hparams(values, metrics, hparam_domain_discrete=domains):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + dump(cfg) + "```", 0)


def _nothing(*args, **kwargs) -> None:
    return None


for _name, _member in vars(RunOutput).items():
    if callable(_member) and not _name.startswith("_") and _name not in vars(NullOutput):
        setattr(NullOutput, _name, _nothing)


def make_output(env: DistEnv, run_dir: str):
    console(env.rank)
    return RunOutput(run_dir) if env.is_main else NullOutput()

