#!/usr/bin/env python
"""Start bsdist: `python launch.py [CONFIG] [KEY.SUB value ...]` (no CONFIG: the defaults), the same under torchrun,
`python launch.py --sweep SWEEP.yaml`, or `python launch.py --report RUNS_DIR` (see bsdist/cli.py)."""

import sys

from bsdist.cli import run

if __name__ == "__main__":
    sys.exit(run())
