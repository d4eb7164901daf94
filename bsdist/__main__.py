"""`python -m bsdist CONFIG [KEY.SUB value ...]` is `python launch.py ...` (bsdist.cli)."""

import sys

from bsdist.cli import run

sys.exit(run())
