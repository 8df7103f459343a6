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


def parse_flags(argv):
    """absl flag parsing with one-line errors instead of tracebacks (pass to app.run)."""
    from llmjax import xla_flags  # before any JAX backend starts
    xla_flags.apply()
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections applies --config.a.b=value overrides while parsing; a key that is not in
        # the (locked) config or a value of the wrong type lands here.
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        fail(f"a --config override does not fit the config ({type(e).__name__}: {e}); check the "
             f"key names and types in {overrides} against the config file.")


def require_config():
    try:
        config = CONFIG.value
        if config is not None:
            config.keys()  # a file that failed to load raises only when first used
    except OSError as e:  # the config file could not be loaded
        reason = str(e).strip().splitlines()[-1].strip()
        fail(f"cannot load the --config file: {reason}.")
    if config is None:
        fail("--config is required, e.g. --config=configs/gpt_small.py:runlocal.")
    return config
