"""The code reads in one window and imports nothing it does not use: ruff's pyflakes checks (F) and
lines of at most 120 characters (E501) over the package, the benchmarks, the tests and launch.py."""

import subprocess
import sys

from paths import ROOT


def test_ruff_finds_no_unused_or_undefined_names_and_no_line_over_120_characters():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E501", "--line-length",
                           "120", "bsdist", "bench", "tests", "launch.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
