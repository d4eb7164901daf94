"""Config as data: one field table (`schema`), YAML files on top of its defaults, `KEY.SUB value`
overrides on top of those, validated once into a frozen `Config` that the code reads as
`cfg.TRAIN.epochs`.

Everything is validated before any process group or run directory exists, and every mistake is one
`BsdistError` line naming the key and the fix. `configs/default.yaml` and the README's config
reference are generated from the table (`python -m bsdist.config [--markdown]`).
"""

from bsdist.config.device import check_device, gpus_expected, resolve_device, resolve_precision, resolve_sync_bn
from bsdist.config.loading import (changed_keys, default_yaml, defaults, dump, get, load, read_yaml, reference_markdown,
                                   to_dict)
from bsdist.config.schema import FIELDS, Config, Field, is_file_list
from bsdist.config.validation import run_dir, validate

__all__ = ["FIELDS", "Config", "Field", "changed_keys", "check_device", "default_yaml", "defaults", "dump", "get",
           "gpus_expected", "is_file_list", "load", "read_yaml", "reference_markdown", "resolve_device",
           "resolve_precision", "resolve_sync_bn", "run_dir", "to_dict", "validate"]
