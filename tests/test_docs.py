"""The README's commands and reference stay those that the code and CI use."""

import os
import re

from bsdist import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def readme_commands():
    return re.findall(r"```bash\n(.*?)```", read("README.md"), re.S)


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1].strip()
    assert "pytest" in test_command
    assert test_command in read(".ci/run").splitlines()


def test_readme_config_reference_is_generated_from_the_schema():
    assert config.reference_markdown() in read("README.md")


def test_readme_configs_exist():
    for name in set(re.findall(r"configs/[\w.]+\.yaml", read("README.md"))):
        assert os.path.isfile(os.path.join(ROOT, name)), name
