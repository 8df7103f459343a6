"""Flags shared by the command-line entry points (train, describe, benchmark)."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/gpt_small.py or configs/gpt_small.py:runlocal; "
    "override any key with --config.key=value.", lock_config=True)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def require_config():
    if CONFIG.value is None:
        fail("--config is required, e.g. --config=configs/gpt_small.py:runlocal.")
    return CONFIG.value
