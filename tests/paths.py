"""Where the tests find the repository (its configs, launch.py, bench/): one definition for every test module."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
