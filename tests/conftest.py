import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # cifar_files, spawn: importable here and in spawned ranks
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # launch.py

from cifar_files import write_cifar  # noqa: E402


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """CIFAR-10 layout: 20 training images per class; 103 test images (not divisible by 2 or 4)."""
    return write_cifar(str(tmp_path_factory.mktemp("cifar10")), 10, train_per_class=20, test_counts=[10] * 9 + [13])


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("cifar100")), 100, train_per_class=6, test_counts=[2] * 100)
