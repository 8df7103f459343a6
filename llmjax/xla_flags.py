"""The XLA flags the framework sets for the train step, before JAX starts its backend.

The GPU flags are the ones MaxText and the JAX GPU performance guide set for transformer
training: the latency-hiding scheduler and pipelined collectives let FSDP's all-gathers and
reduce-scatters run under the matmuls, and while-loop double buffering fetches the next scanned
layer's weights during the current one. Combining small collectives into large ones keeps the
interconnect busy. The CPU and TPU backends ignore GPU flags (all flags are parsed everywhere, so
an unknown one would stop JAX at start-up: tests/test_fast_paths.py starts a process with them).

A flag already in the environment's XLA_FLAGS wins over ours, so any of these can be turned off or
retuned from the shell, e.g. XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false.
"""

from __future__ import annotations

import os

GPU_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 30),
}


def with_defaults(current: str, defaults: dict[str, str] = GPU_FLAGS) -> str:
    """`current` XLA_FLAGS plus every default it does not set itself."""
    given = {part.lstrip("-").split("=", 1)[0] for part in current.split()}
    extra = [f"--{k}={v}" for k, v in defaults.items() if k not in given]
    return " ".join([current.strip()] + extra).strip()


def apply() -> None:
    """Adds the defaults to os.environ["XLA_FLAGS"]; call before the first JAX computation."""
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
