#!/usr/bin/env python
"""Start a bsdist run: `python launch.py CONFIG [KEY.SUB value ...]`, or the same under torchrun.

This file only parses the command line, validates the config (before any process group or run
directory exists) and hands it to bsdist.train.main.
"""

from __future__ import annotations

import argparse
import sys
import traceback


def parse_args(argv):
    parser = argparse.ArgumentParser(
        usage="launch.py CONFIG [KEY.SUB value ...] [--debug]",
        description="Long-tailed image classification with Balanced Softmax on raw torch.distributed.",
        epilog="Example: torchrun --nproc_per_node 8 launch.py configs/cifar100lt_bs.yaml TRAIN.epochs 200")
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    args, overrides = parser.parse_known_args(argv)  # flags may stand anywhere; the rest are KEY.SUB value pairs
    unknown = [a for a in overrides if a.startswith("--")]
    if unknown:
        parser.error(f"unknown option {unknown[0]}; overrides are written KEY.SUB value, without dashes")
    args.overrides = overrides
    return args


def run(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from bsdist import BsdistError, config
    from bsdist.data import check_available
    from bsdist.distributed import launched_as_main, world_size_from_env
    try:
        cfg = config.validate(config.load(args.config, args.overrides), world_size_from_env())
        check_available(cfg)
        from bsdist.train import main
        main(cfg)
    except BsdistError as e:
        if launched_as_main():  # under torchrun every rank fails alike: say it once
            if args.debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
