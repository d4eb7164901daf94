"""`launch.py --evaluate RUN_DIR [--posthoc logit-adjust|tau-norm|all]`: a finished run's selected model
(best.pt) evaluated again, as it is and with post-hoc adjustments, with exact all-reduced metrics.

- logit adjustment (Menon et al., ICLR 2021): predict with logits - tau * log(prior), the prior being
  the training class counts; tau = 1 is the method's fixed point, and tau chosen on TAU_GRID;
- tau-normalisation (Kang et al., ICLR 2020): the classifier's rows divided by their norm ** tau, as
  the authors compute it (features . W_tau, without the bias); tau chosen on TAU_GRID.

Each tuned tau maximises the validation split's bcr (the smallest such tau on a tie); a run without a
validation split is refused, since tuning on the test set would select on it. The backbone runs once
per split: its features stay on this rank's device and every variant is the classifier applied to
them. Prints one line per variant and writes evaluate.json into the run directory: per variant, its
tau and the metrics of every split (acc, bcr, many / medium / few, ECE, NLL, confusion matrix).
"""

from __future__ import annotations

import os

import torch

from bsdist import checkpoint, config
from bsdist.data import build_data
from bsdist.distributed import DistEnv, all_reduce_sum
from bsdist.errors import BsdistError
from bsdist.evaluation import forward_batches
from bsdist.method import broadcast_class_prior
from bsdist.metrics import EvalTally
from bsdist.models import classifier as classifier_of
from bsdist.models import create
from bsdist.rundir import saved_config, selected_checkpoint
from bsdist.runlock import hold_run_dir
from bsdist.runtime import Runtime, resolve_runtime
from bsdist.session import session

TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0
METHODS = ("logit-adjust", "tau-norm")
# What --evaluate may change in a run's config: where and how fast it runs, never what is measured.
EVALUATE_CHANGES = {"TRAIN.device", "DATASET.datadir", "DATASET.download", "DATASET.test_batch_size", "DATASET.loader",
                    "DATASET.num_workers", "TRAIN.dist_backend", "TRAIN.dist_timeout_s", "TRAIN.dist_startup_timeout_s",
                    "TRAIN.mixed_precision"}


def logit_adjusted(logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    return logits - tau * log_prior


def tau_normalised(features: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    return features @ (weight / weight.norm(dim=1, keepdim=True).pow(tau)).T


def evaluation_config(run_dir: str, overrides: list[str]) -> config.Config:
    """The run's saved config with the overrides that may change, validated; one error line for any other."""
    if selected_checkpoint(run_dir) is None:
        raise BsdistError(f"{run_dir} holds no finished run (results.json and best.pt); finish it first "
                          "(run its config again with TRAIN.resume auto)")
    cfg = saved_config(run_dir)
    for key in overrides[::2]:
        if key not in EVALUATE_CHANGES:
            raise BsdistError(f"--evaluate takes the run's own config; {key} would change what is measured. "
                              f"Overrides may set {', '.join(sorted(EVALUATE_CHANGES))}")
    # world size 1: evaluation splits its test batches, and the training batch need not divide by this world size
    return config.validate(config.load(None, list(overrides), base=config.to_dict(cfg)), 1)


def evaluate_run(run_dir: str, methods: list[str], overrides: list[str] = ()) -> dict:
    """Every rank: evaluate the run's best.pt plainly and with `methods`; rank 0 writes evaluate.json."""
    cfg = evaluation_config(run_dir, list(overrides))
    # It writes evaluate.json, so it holds the run directory like a run: two evaluations with different
    # --posthoc would otherwise leave whichever wrote last, and a training run cannot start there meanwhile.
    with hold_run_dir(run_dir), session(cfg, run_dir) as (env, out):
        return _evaluate(cfg, env, out, run_dir, methods)


@torch.no_grad()
def _evaluate(cfg: config.Config, env: DistEnv, out, run_dir: str, methods: list[str]) -> dict:
    data = build_data(cfg, env)
    if methods and "val" not in data.eval:  # the same answer on every rank: they all stop here
        raise BsdistError(f"{run_dir} has no validation split (DATASET.val_per_cls 0 and no validation list): tuning "
                          "tau on the test set would select on it; train with DATASET.val_per_cls > 0 (or a validation "
                          "list) to use --posthoc")
    num_per_cls = broadcast_class_prior(data.num_per_cls, env)
    model = create(cfg, data.num_classes, data.in_channels, env.device, sync_bn=False, pretrained=False)
    model.load_state_dict(checkpoint.load(os.path.join(run_dir, "best.pt"))["model"])
    model.eval()
    runtime = resolve_runtime(cfg, env)
    classifier = classifier_of(model)
    features = {split: _features(model, classifier, loader, data.augment.normalize, runtime)
                for split, loader in data.eval.items()}
    weight, bias = classifier.weight.float(), classifier.bias.float()
    log_prior = torch.tensor(num_per_cls, dtype=torch.float32, device=env.device).log()

    def metrics(head) -> dict:
        return {split: _metrics(head, x, y, data.num_classes, num_per_cls) for split, (x, y) in features.items()}

    plain = lambda x: x @ weight.T + bias  # noqa: E731
    variants = {"plain": {"tau": None, **metrics(plain)}}
    if "logit-adjust" in methods:
        variants["logit-adjust-tau1"] = {"tau": 1.0, **metrics(lambda x: logit_adjusted(plain(x), log_prior, 1.0))}
        variants["logit-adjust"] = _tuned(lambda tau: metrics(lambda x: logit_adjusted(plain(x), log_prior, tau)))
    if "tau-norm" in methods:
        variants["tau-norm"] = _tuned(lambda tau: metrics(lambda x: tau_normalised(x, weight, tau)))
    for name, v in variants.items():
        tau = "" if v["tau"] is None else f" tau {v['tau']:g}" + (" (chosen on val bcr)" if "grid" in v else "")
        out.info(f"{name}{tau}: " + "  ".join(f"{split} acc {m['acc']:.4f} bcr {m['bcr']:.4f} ece {m['ece']:.4f} "
                                               f"nll {m['nll']:.4f}" for split, m in v.items() if split in features))
    out.write_json("evaluate.json", {"checkpoint": "best.pt", "tau_grid": list(TAU_GRID), "variants": variants})
    out.info(f"wrote {os.path.join(run_dir, 'evaluate.json')}")
    return variants


def _features(model, classifier, loader, normalize, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(the classifier's inputs, targets) of this rank's shard of a split, on the device: evaluation's
    forward pass, with the classifier's inputs kept."""
    captured, targets = [], []
    hook = classifier.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float()))
    try:
        for _, batch_targets in forward_batches(model, loader, normalize, runtime):
            targets.append(batch_targets)
    finally:
        hook.remove()
    if not captured:  # a shard with no image: a split smaller than the world size
        return (torch.empty(0, classifier.in_features, device=runtime.device),
                torch.empty(0, dtype=torch.long, device=runtime.device))
    return torch.cat(captured), torch.cat(targets)


def _metrics(head, features: torch.Tensor, targets: torch.Tensor, num_classes: int, num_per_cls: list[int],
             rows: int = 4096) -> dict:
    """Metrics of the whole split from each rank's shard of features and the logits `head` gives them:
    all-reduced sums, as evaluation has them. The logits are made `rows` at a time: a shard's at once
    would be 0.8 GB at iNaturalist's 8,142 classes, and every variant's head makes a few copies."""
    tally = EvalTally(num_classes, features.device)
    for start in range(0, len(features), rows):
        tally.add(head(features[start:start + rows]), targets[start:start + rows])
    tally.reduce(all_reduce_sum)
    return tally.summary(num_per_cls)


def _tuned(metrics_at) -> dict:
    """The variant at the tau of TAU_GRID with the highest validation bcr (the smallest on a tie)."""
    grid = {tau: metrics_at(tau) for tau in TAU_GRID}
    best = max(TAU_GRID, key=lambda tau: (round(grid[tau]["val"]["bcr"], 12), -tau))  # sums in another order: equal
    return {"tau": best, **grid[best], "grid": {f"{tau:g}": grid[tau]["val"]["bcr"] for tau in TAU_GRID}}
