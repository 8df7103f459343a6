"""Train a model: python -m llmjax.main --config=configs/gpt_small.py --workdir=DIR.

Any config key can be overridden with --config.key=value (e.g. --config.total_steps=100
--config.mesh.shape="(2,2,2)"). Running the same command again in the same workdir resumes.
Multi-host (TPU pod slices, SLURM GPU clusters): add --distributed, which calls
jax.distributed.initialize() and lets JAX detect the cluster; or give --coordinator_address,
--num_processes and --process_id explicitly.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from llmjax import cli

WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the tokenizer go.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Initialise JAX's multi-controller runtime.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

# Errors a user can cause from the config, the data or the command line; anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags look like --config.key=value.")
    config = cli.require_config()
    if not WORKDIR.value:
        cli.fail("--workdir is required: the directory for checkpoints, metrics and the tokenizer.")
    import jax
    if COORDINATOR.value or DISTRIBUTED.value:
        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    from llmjax.checkpoint import CheckpointWriteError
    from llmjax.train import NonFiniteError
    logging.set_verbosity(logging.WARNING)
    try:
        run(config, WORKDIR.value)
    except USER_ERRORS as e:
        cli.fail(one_line(e))
    except NonFiniteError as e:  # the run diverged: not a usage error, so another exit status
        cli.fail(one_line(e), code=3)
    except CheckpointWriteError as e:  # full disk or failing storage; the last checkpoint is kept
        cli.fail(one_line(e), code=4)


def one_line(error: BaseException) -> str:
    # KeyError's str() is the repr of its argument: quoted.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = str(text).strip()
    return text.splitlines()[0] if text else repr(error)


def run(config, workdir: str) -> dict:
    """Validates, then trains. Config errors raise before the workdir is created or touched;
    see the README's "Bad configs and data" table."""
    from llmjax.train import train_and_evaluate
    from llmjax.validate import validate_config
    validate_config(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    return train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
