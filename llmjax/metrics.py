"""Metric writers, the console progress line, FLOPs per token and model-FLOPs utilisation (MFU).

Metric names the trainer and this module agree on (all optional):
    loss, learning_rate, grad_norm, tokens_per_sec, mfu (a fraction, 0.123 = 12.3%),
    step_time_ms, eval_loss, eval_perplexity. Any other key is written and printed too.

MFU = achieved model FLOP/s / (devices * peak FLOP/s per device). On TPU and GPU the peak is the
vendor's dense bfloat16 figure from `PEAK_FLOPS`. A CPU has no such figure, so there the peak is a
float32 matmul throughput measured once per process: CPU MFU is relative to what XLA's own matmul
reaches on that machine, not to a hardware specification.
"""

import json
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter, record_writer

from llmjax import paths

# ---------------------------------------------------------------------------------------------
# Writers


def _plain(value):
    """Python scalars (or lists) from numpy/jax values, so json and tensorboardX accept them."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        return [_plain(v) for v in arr.tolist()]
    x = arr.reshape(())
    if arr.dtype.kind == "b":
        return bool(x)
    if arr.dtype.kind in "iu":
        return int(x)
    if arr.dtype.kind in "US":
        return str(x)
    return float(x)  # floats, including ml_dtypes' bfloat16 (dtype kind "V")


def _json_safe(value):
    """NaN and +-Inf become the strings "nan", "inf", "-inf": the file stays strict JSON, the
    value survives (float("inf") reads it back), and a diverged loss is not mistaken for a gap."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class MetricWriter:
    """Appends one JSON object per `write` to WORKDIR/metrics.jsonl and logs scalars to
    TensorBoard under WORKDIR/tb. Only the process with `enabled=True` (process 0) writes.

    The file is opened for appending, so a resumed run continues the same file, and flushed on
    every write, so a killed run keeps every line it logged. Non-finite floats are written as the
    strings "nan", "inf" and "-inf". In a gs:// WORKDIR both files are `paths.RewrittenFile`s,
    uploaded at most every `paths.UPLOAD_EVERY_S` seconds and on close.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._file = self._tb = None
        self._warned = set()
        if enabled:
            directory = paths.path(workdir)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = str(directory / "metrics.jsonl")
            self._file = paths.open_append(self.path)
            self._tb = SummaryWriter(str(directory / "tb"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        step = int(step)
        record = {"step": step}
        record.update({k: _plain(v) for k, v in metrics.items() if k != "step"})
        line = json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False)
        # A full disk or a failing mount must not stop a healthy run: a failed write is reported
        # once (per file) and the run goes on; the checkpoints are what a resume needs.
        self._guarded(self.path, self._write_line, line)
        self._guarded(os.path.dirname(self.path) + "/tb", self._write_tb, record, step)

    def _write_line(self, line: str):
        self._file.write(line + "\n")
        self._file.flush()

    def _write_tb(self, record: dict, step: int):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def _guarded(self, where: str, fn, *args):
        try:
            fn(*args)
        except OSError as e:
            if where not in self._warned:
                self._warned.add(where)
                print(f"warning: cannot write {where} ({e.strerror or e}); training goes on, "
                      "this is reported once.", file=sys.stderr, flush=True)

    def close(self):
        if self._file is not None:
            self._guarded(self.path, self._file.close)
            self._guarded(os.path.dirname(self.path) + "/tb", self._tb.close)
            self._file = self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _EpathEventFiles:
    """tensorboardX writes gs:// event files through this (epath, as every workdir file) instead
    of its own google-cloud-storage writer."""

    def open(self, path):
        return paths.RewrittenFile(path)

    def directory_check(self, path):  # object stores have no directories to create
        pass


record_writer.register_writer_factory("gs", _EpathEventFiles())


# ---------------------------------------------------------------------------------------------
# Console line


def _si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.0f}"


# key -> how it reads on the console, in display order.
_FORMATS = {
    "loss": lambda v: f"loss {v:.3f}",
    "learning_rate": lambda v: f"lr {v:.1e}",
    "grad_norm": lambda v: f"gnorm {v:.2f}",
    "tokens_per_sec": lambda v: f"{_si(v)} tok/s",
    "mfu": lambda v: f"mfu {100 * v:.1f}%",
    "step_time_ms": lambda v: f"{v:.0f} ms/step",
    "host_rss_mib": lambda v: f"rss {v / 1024:.2f} GiB",
    "eval_loss": lambda v: f"eval_loss {v:.3f}",
    "eval_perplexity": lambda v: f"eval_ppl {v:.2f}",
}


def host_rss_mib() -> float:
    """This process's resident host memory (MiB): logged with every train record, so a leak over
    a long run shows in metrics.jsonl (tests/test_long_run.py bounds its growth)."""
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().memory_info().rss / 2**20


def format_line(step: int, total_steps: int | None, metrics: dict) -> str:
    """E.g. `step  120/1000 | loss 3.412 | lr 2.9e-04 | gnorm 0.83 | 41.2k tok/s | mfu 12.3% |
    210 ms/step`. Absent keys are skipped; keys outside the known set follow as `name value`."""
    if total_steps:
        parts = [f"step {int(step):>{len(str(total_steps))}d}/{total_steps}"]
    else:
        parts = [f"step {int(step)}"]
    values = {k: _plain(v) for k, v in metrics.items() if k != "step"}
    for key, fmt in _FORMATS.items():
        if isinstance(values.get(key), (int, float)):
            parts.append(fmt(values[key]))
    for key, value in values.items():
        if key in _FORMATS and isinstance(value, (int, float)):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s, FLOPs per token, MFU

# Dense (no structured sparsity) bfloat16 peak FLOP/s per JAX device, matched as lower-case
# substrings of `device.device_kind` in this order, so the more specific names come first.
# NVIDIA datasheets quote "with sparsity" figures; the dense figure is half of that.
PEAK_FLOPS = (
    # TPU v2 and v3 expose each of a chip's two cores as a device: half the per-chip figure.
    ("tpu v2", 45e12 / 2),  # cloud.google.com/tpu/docs/v2: 45 TFLOP/s per chip
    ("tpu v3", 123e12 / 2),  # cloud.google.com/tpu/docs/v3: 123 TFLOP/s per chip
    ("tpu v4 lite", 137e12),  # v4i; jax/_src/pallas/mosaic/tpu_info.py
    ("tpu v4", 275e12),  # cloud.google.com/tpu/docs/v4 (megacore: one device per chip)
    ("tpu v5 lite", 197e12),  # cloud.google.com/tpu/docs/v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5" or "TPU v5p"; cloud.google.com/tpu/docs/v5p
    ("tpu v6 lite", 918e12),  # cloud.google.com/tpu/docs/v6e
    ("tpu v6e", 918e12),
    ("tpu7x", 2307e12 / 2),  # cloud.google.com/tpu/docs/tpu7x: 2307 per chip, one device per core
    ("gb200", 2500e12),  # NVIDIA GB200 NVL72: 360 PFLOP/s sparse BF16 over 72 GPUs
    ("b200", 2250e12),  # NVIDIA HGX B200: 36 PFLOP/s sparse BF16 over 8 GPUs
    ("gh200", 989e12),  # Grace Hopper: H100-class GPU
    ("h200", 989e12),  # NVIDIA H200 datasheet: 1979 sparse
    ("h100 pcie", 756e12),  # NVIDIA H100 datasheet: 1513 sparse
    ("h100 nvl", 835e12),  # 1671 sparse
    ("h100", 989e12),  # SXM: 1979 sparse
    ("a100", 312e12),  # NVIDIA A100 datasheet (SXM and PCIe alike)
    ("a10g", 70e12),  # AWS's A10 variant; baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference
    ("a10", 125e12),  # NVIDIA A10 datasheet: 250 sparse
    ("l40s", 362e12),  # NVIDIA L40S datasheet: 733 sparse
    ("l40", 181e12),  # NVIDIA L40 datasheet: 362 sparse
    ("l4", 121e12),  # NVIDIA L4 datasheet: 242 sparse
    ("v100", 125e12),  # float16 (V100 has no bfloat16); Volta datasheet, SXM2
    ("t4", 65e12),  # float16; NVIDIA T4 datasheet
    ("mi300x", 1307e12),  # AMD Instinct MI300X datasheet, dense BF16
)

_CPU_MATMUL_FLOPS = None  # measured machine-wide float32 matmul FLOP/s, cached per process
_warned_kinds = set()


def cpu_matmul_flops(size: int = 1024, budget_s: float = 0.2) -> float:
    """FLOP/s of a jitted float32 `size`-cubed matmul on the CPU backend: the best of as many runs
    (at least 3) as fit in `budget_s`, so a busy or a fast machine still gets a fair sample.

    Measured once per process and cached. 1024 is large enough for XLA's multithreaded kernel
    (about 20 ms a run on two cores; STACK.md saw ~180 GFLOP/s at 4096 on an idle machine).
    """
    global _CPU_MATMUL_FLOPS
    if _CPU_MATMUL_FLOPS is None:
        cpu = jax.devices("cpu")[0]
        a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
        b = jax.device_put(jnp.full((size, size), 0.5, jnp.float32), cpu)
        matmul = jax.jit(jnp.matmul)
        matmul(a, b).block_until_ready()  # compile outside the timing
        best, spent, runs = math.inf, 0.0, 0
        while runs < 3 or spent < budget_s:
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            elapsed = time.perf_counter() - start
            best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
        _CPU_MATMUL_FLOPS = 2 * size**3 / best
    return _CPU_MATMUL_FLOPS


def peak_flops_per_device(device=None, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override` if > 0, else `PEAK_FLOPS` for TPU/GPU, else (CPU) the
    measured matmul throughput divided by the local CPU devices, since fake multi-device CPU
    meshes share the same cores. An unknown accelerator gives NaN (so MFU reads NaN) and a warning.
    """
    if override:
        return float(override)
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        return cpu_matmul_flops() / len(jax.local_devices(backend="cpu"))
    kind = device.device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    if kind not in _warned_kinds:
        _warned_kinds.add(kind)
        logging.warning("No peak FLOP/s known for device kind %r; MFU will be NaN. Pass the "
                        "device's dense bf16 FLOP/s as the peak-FLOPs override.", device.device_kind)
    return math.nan


def flops_per_token(*, non_embedding_params: int, vocab_size: int, d_model: int, num_layers: int,
                    num_heads: int, head_dim: int, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token, PaLM's appendix B convention, as nanoGPT's
    `estimate_mfu`: 6 * N + 12 * L * H * Q * T.

    N counts the parameters that take part in matmuls: `non_embedding_params` (everything but the
    token and position tables, and but an untied output head) plus vocab_size * d_model for the
    output projection, which is a matmul whether or not it is tied to the input embedding (the
    input lookup is a gather and costs no FLOPs). The attention term counts the whole T x T score
    matrix even for causal models, as PaLM and nanoGPT do and as dense XLA attention computes it,
    so the figures compare with published MFU numbers.
    """
    matmul_params = non_embedding_params + vocab_size * d_model
    return 6 * matmul_params + 12 * num_layers * num_heads * head_dim * seq_len


def encoder_decoder_flops_per_token(*, encoder_params: int, decoder_params: int, vocab_size: int,
                                    d_model: int, encoder_layers: int, decoder_layers: int,
                                    num_heads: int, head_dim: int, inputs_length: int,
                                    targets_length: int) -> int:
    """`flops_per_token`'s convention for an encoder-decoder, per encoder input token: each stack's
    6 * N over its own tokens, the output head over the targets, and the attention score matrices
    (encoder T_in x T_in, decoder self T_out x T_out, cross T_out x T_in). The decoder's cross-
    attention key/value projections really run over T_in, not T_out; counting them over T_out
    keeps the formula in parameter counts, as published encoder-decoder MFU figures do."""
    per_step = (6 * encoder_params * inputs_length
                + 6 * (decoder_params + vocab_size * d_model) * targets_length
                + 12 * num_heads * head_dim * (encoder_layers * inputs_length ** 2
                                               + decoder_layers * targets_length ** 2
                                               + decoder_layers * targets_length * inputs_length))
    return per_step // inputs_length


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak_flops: float) -> float:
    """Model-FLOPs utilisation as a fraction: achieved FLOP/s over the devices' summed peak."""
    return tokens_per_sec * flops_per_token / (num_devices * peak_flops)


def throughput(*, tokens_per_step: int, step_seconds: float, flops_per_token: float,
               num_devices: int, peak_flops: float) -> dict:
    """`{"tokens_per_sec", "mfu"}` for one step, keyed as `format_line` and the writers expect."""
    tokens_per_sec = tokens_per_step / step_seconds
    return {"tokens_per_sec": tokens_per_sec,
            "mfu": mfu(tokens_per_sec, flops_per_token, num_devices, peak_flops)}
