"""The command line behind launch.py: one run, a sweep of runs, or a report of finished runs.

    launch.py [CONFIG] [KEY.SUB value ...]          one run (plain python or under torchrun); no CONFIG: the defaults
    launch.py [CONFIG] --slurm --partition gpu [...]  the same run submitted to SLURM (bsdist.slurm)
    launch.py --sweep SWEEP.yaml [--jobs N] [--nproc-per-node K] [--slurm ...] [KEY.SUB value ...]
    launch.py CONFIG --seeds 0 1 2 [...]            the run once per seed, as a sweep (also with --sweep)
    launch.py --report RUNS_DIR
    launch.py [CONFIG] --check-data [--decode] [KEY.SUB value ...]   what the data holds, and what is wrong with it
    launch.py --evaluate RUN_DIR [--posthoc logit-adjust|tau-norm|all] [KEY.SUB value ...]   (also under torchrun)

It parses, validates before any process group or directory exists, and hands over; errors are one
line on stderr (a traceback with --debug), printed by rank 0 alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

DEFAULTS = ("using the defaults (configs/default.yaml's values); choose another config with "
            "python launch.py CONFIG [KEY.SUB value ...], e.g. configs/demo.yaml")


def parse_args(argv):
    from bsdist.posthoc import METHODS
    parser = argparse.ArgumentParser(
        prog="launch.py", usage="launch.py [CONFIG] [KEY.SUB value ...] | --sweep SWEEP.yaml | --report RUNS_DIR | "
              "--evaluate RUN_DIR [--posthoc METHOD]  [--seeds S ...] [--slurm ...] [--debug]",
        description="Long-tailed image classification with Balanced Softmax on raw torch.distributed.",
        epilog="Example: torchrun --nproc_per_node 8 launch.py configs/cifar100lt_bs.yaml TRAIN.epochs 200")
    parser.add_argument("config", nargs="?",
                        help=f"YAML config file (see configs/); without one, {DEFAULTS}")
    parser.add_argument("--sweep", metavar="SWEEP.yaml",
                        help="run every configuration of a sweep file (see configs/sweeps/)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="train each run with each of these DEFAULT.seed values (a sweep axis); "
                             "the report gives mean ± std")
    parser.add_argument("--jobs", type=int,
                        help="sweep runs at once, spread over the visible GPUs (default 1 here; with --slurm, all)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="processes (GPUs) per sweep run, started with torchrun")
    parser.add_argument("--report", metavar="RUNS_DIR", help="tabulate and plot every finished run under RUNS_DIR")
    parser.add_argument("--evaluate", metavar="RUN_DIR",
                        help="evaluate a finished run's selected model (best.pt) again")
    parser.add_argument("--posthoc", choices=(*METHODS, "all"),
                        help="with --evaluate: post-hoc adjustment(s), tau tuned on the validation split")
    parser.add_argument("--check-data", action="store_true",
                        help="report each split's images and classes and every problem of the config's data; "
                             "exit 1 on any")
    parser.add_argument("--decode", action="store_true", help="with --check-data: also decode every image, in parallel")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    from bsdist import slurm
    slurm_flags = slurm.add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)  # flags may stand anywhere; the rest are KEY.SUB value pairs
    unknown = [a for a in overrides if a.startswith("--")]
    if unknown:
        parser.error(f"unknown option {unknown[0]}; overrides are written KEY.SUB value, without dashes")
    if args.config is not None and (args.sweep or args.report or args.evaluate or _is_override(args.config)):
        # with --sweep/--report/--evaluate, or written as a key (TRAIN.epochs), a positional is an override
        overrides, args.config = [args.config, *overrides], None
    modes = [m for m in (args.sweep, args.report, args.evaluate) if m is not None]
    if len(modes) > 1:
        parser.error("give at most one of --sweep SWEEP.yaml, --report RUNS_DIR or --evaluate RUN_DIR")
    if args.check_data and modes:
        parser.error("--check-data checks the data of a CONFIG (or the defaults'): drop --sweep, --report, --evaluate")
    if args.decode and not args.check_data:
        parser.error("--decode goes with --check-data (python launch.py CONFIG --check-data --decode)")
    if args.check_data and (args.slurm or args.seeds):
        parser.error("--check-data runs here; drop --slurm and --seeds")
    if args.posthoc and not args.evaluate:
        parser.error("--posthoc goes with --evaluate RUN_DIR")
    if args.evaluate and (args.slurm or args.seeds):
        parser.error("--evaluate runs here (under torchrun for several GPUs); drop --slurm and --seeds")
    if overrides and args.report:
        parser.error(f"extra arguments ({overrides[0]} ...) do not go with --report, which takes just RUNS_DIR")
    if args.seeds is not None and (not (args.config or args.sweep) or len(set(args.seeds)) != len(args.seeds)
                                   or min(args.seeds) < 0):
        parser.error("--seeds takes distinct seeds >= 0 (e.g. --seeds 0 1 2) for a CONFIG or a --sweep")
    if (args.jobs is not None and args.jobs < 1) or args.nproc_per_node < 1:
        parser.error("--jobs and --nproc-per-node must be at least 1")
    slurm_given = [f"--{k.replace('_', '-')}" for k in slurm_flags if getattr(args, k) != parser.get_default(k)]
    if slurm_given and not args.slurm:
        parser.error(f"{slurm_given[0]} is a SLURM option: add --slurm to submit the run to SLURM")
    if args.slurm and args.report:
        parser.error("--report reads finished runs here; drop --slurm")
    if args.slurm and args.nproc_per_node != 1:
        parser.error("--nproc-per-node is for sweeps run here; with --slurm give --gpus-per-node or --ntasks-per-node")
    args.overrides = overrides
    return args


def _is_override(token: str) -> bool:
    """Whether a first positional is a `KEY.SUB` override (its section is a config section) rather than CONFIG."""
    from bsdist.config import FIELDS
    return token.split(".", 1)[0] in {key.split(".", 1)[0] for key in FIELDS} and not os.path.exists(token)


def run(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config is None and not (args.sweep or args.report or args.evaluate):
        from bsdist.output import LOG
        LOG.info(f"no CONFIG given: {DEFAULTS}")  # the first line, rank 0's alone
    from bsdist import BsdistError, config
    from bsdist.data import check_available
    from bsdist.distributed import launched_as_main, world_size_from_env
    from bsdist.rundir import stage1_checkpoint
    try:
        if args.slurm:
            return submit_to_slurm(args)
        if args.sweep or args.seeds:
            from bsdist.local import run_sweep
            return run_sweep(args.sweep, jobs=args.jobs or 1, nproc_per_node=args.nproc_per_node,
                             overrides=args.overrides, seeds=args.seeds, config_path=args.config)
        if args.report:
            from bsdist.report import write_report
            write_report(args.report)
            return 0
        if args.evaluate:
            from bsdist.posthoc import METHODS, evaluate_run
            methods = list(METHODS) if args.posthoc == "all" else [args.posthoc] if args.posthoc else []
            evaluate_run(args.evaluate, methods, args.overrides)
            return 0
        cfg = config.validate(config.load(args.config, args.overrides), world_size_from_env(),
                              device_here=not args.check_data)
        check_available(cfg)
        if args.check_data:
            from bsdist.data.check import check_data
            return check_data(cfg, decode=args.decode)
        if launched_as_main():  # rank 0 reads the run directories for every rank (bsdist.rundir.plan_start)
            stage1_checkpoint(cfg)
        from bsdist.train import main
        main(cfg)
    except BsdistError as e:
        if launched_as_main() or e.every_rank_reports:  # under torchrun every rank fails alike: say it once
            if args.debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr, flush=True)
        tell_launcher(f"error: {e}")  # every rank: torchrun names whichever failed first
        return e.exit_code
    return 0


def tell_launcher(message: str) -> None:
    """Under torchrun, put the message where its failure summary (the last lines a user sees) shows it.

    Not torch's `@record` (tried): it writes the error file only for an exception that escapes the entry point
    (a traceback on every rank's stderr, exit status 1), and it stores the traceback as `py_callstack`, which
    the summary shows in place of the message: a dozen lines ending in `bsdist.errors.BsdistError: ...`. This
    file holds the one line alone.
    """
    import json
    import time
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


def submit_to_slurm(args) -> int:
    """Validate here (all but the device, which is the nodes' business) and submit."""
    from bsdist import config, slurm
    slurm.check_arguments(args)
    if args.sweep or args.seeds:
        from bsdist.sweep import check_runs, load_runs
        source = (args.sweep, args.config, args.seeds)
        _, runs = load_runs(*source, 1, device_here=False, overrides=args.overrides)  # tasks depend on TRAIN.device
        _, runs = load_runs(*source, slurm.world_size(args, runs[0].cfg), device_here=False, overrides=args.overrides)
        check_runs(runs)
        return slurm.submit_sweep(args, runs)
    from bsdist.data import check_available
    cfg = config.validate(config.load(args.config, args.overrides), 1, device_here=False)
    cfg = config.validate(cfg, slurm.world_size(args, cfg), device_here=False)
    check_available(cfg)
    from bsdist.rundir import stage1_checkpoint
    stage1_checkpoint(cfg)
    return slurm.submit(args, cfg)


if __name__ == "__main__":
    sys.exit(run())
