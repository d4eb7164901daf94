"""The README's commands and reference stay those that the code and CI use."""

import os
import re

from bsdist import config
from paths import ROOT



def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def readme_section(heading):
    """The text under a `## heading` of the README, up to the next heading of that level."""
    text = read("README.md")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", readme_section("Quick start"), re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 2  # the quick one, and everything as CI runs it
    quick, everything = commands
    assert quick.endswith("python -m pytest -q") and everything.endswith('-m "slow or not slow"')
    assert everything in read(".ci/run").splitlines()


def test_readme_config_reference_is_generated_from_the_schema(monkeypatch):
    import dataclasses

    from bsdist.config.schema import MODEL_NAMES
    own = dataclasses.replace(config.FIELDS["MODEL.name"], choices=MODEL_NAMES)
    monkeypatch.setitem(config.FIELDS, "MODEL.name", own)  # not the tests' own models (tests/tiny_model.py)
    assert config.reference_markdown() in read("README.md")


def test_readme_configs_exist():
    for name in set(re.findall(r"configs/[\w.]+\.yaml", read("README.md"))):
        assert os.path.isfile(os.path.join(ROOT, name)), name
