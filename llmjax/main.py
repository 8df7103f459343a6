"""Train a model: python -m llmjax.main --config=configs/gpt_small.py --workdir=DIR.

Any config key can be overridden with --config.key=value (e.g. --config.total_steps=100
--config.mesh.shape="(2,2,2)"). Running the same command again in the same workdir resumes.
Multi-host (TPU pod slices, SLURM GPU clusters): add --distributed, which calls
jax.distributed.initialize() and lets JAX detect the cluster; or give --coordinator_address,
--num_processes and --process_id explicitly. A multi-host trainer runs as the child of a small
parent (llmjax/supervise.py) that turns JAX's abort on a lost peer into one line.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from llmjax import cli

WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the tokenizer go.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Initialise JAX's multi-controller runtime.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
HEARTBEAT_TIMEOUT = flags.DEFINE_float(
    "heartbeat_timeout", 60, "Multi-host: seconds a process may go silent before it counts as lost "
    "and every process stops with one line (llmjax/multihost.py).")

# Errors a user can cause from the config, the data or the command line; anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags look like --config.key=value.")
    config = cli.require_config()
    if not WORKDIR.value:
        cli.fail("--workdir is required: the directory for checkpoints, metrics and the tokenizer.")
    from llmjax import supervise
    if supervise.should_supervise(bool(COORDINATOR.value or DISTRIBUTED.value)):
        sys.exit(supervise.run())  # this command again, as a child that may lose its peers
    if COORDINATOR.value or DISTRIBUTED.value:
        initialize_distributed()
    from llmjax.checkpoint import CheckpointWriteError
    from llmjax.train import NonFiniteError
    logging.set_verbosity(logging.WARNING)
    from llmjax import multihost
    try:
        run(config, WORKDIR.value)
    except USER_ERRORS as e:
        multihost.abandon()
        cli.fail(one_line(e))
    except NonFiniteError as e:  # the run diverged: not a usage error, so another exit status
        multihost.abandon()
        cli.fail(one_line(e), code=3)
    except CheckpointWriteError as e:  # full disk or failing storage; the last checkpoint is kept
        multihost.abandon()
        cli.fail(one_line(e), code=5)
    except Exception as e:  # a collective failing because another process died: say which
        multihost.explain_failure(e)
        multihost.abandon()
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit
        multihost.abandon()
        raise
    multihost.finish()


def initialize_distributed() -> None:
    """jax.distributed.initialize with the flags given, plus the lost-process watchdog
    (llmjax/multihost.py); what the flags leave unset comes from the cluster's environment (SLURM,
    Cloud TPU VM metadata, Open MPI, Kubernetes). Finding none is one line, not a traceback.
    Launch scripts and their errors: docs/launch.md."""
    from llmjax import multihost
    try:
        multihost.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                             timeout_s=HEARTBEAT_TIMEOUT.value)
    except ValueError as e:
        hint = ("" if COORDINATOR.value else " No cluster environment (SLURM, Cloud TPU, Open MPI, "
                "Kubernetes) was found: give --coordinator_address=HOST:PORT --num_processes=N "
                "--process_id=I.")
        cli.fail(f"jax.distributed.initialize: {one_line(e)}{hint} See docs/launch.md.")


def one_line(error: BaseException) -> str:
    # KeyError's str() is the repr of its argument: quoted.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = str(text).strip()
    return text.splitlines()[0] if text else repr(error)


def run(config, workdir: str) -> dict:
    """Validates, then trains. Config errors raise before the workdir is created or touched;
    see the "Bad configs and data" table in docs/configs.md."""
    from llmjax.train import train_and_evaluate
    from llmjax.validate import validate_config
    from llmjax import paths
    validate_config(config, workdir)
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    return train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
