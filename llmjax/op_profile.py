"""Where a compiled step spends its time, per XLA operation: `python -m llmjax.benchmark
--profile=DIR` traces a few steps with `jax.profiler` and prints this table.

The trace (DIR/plugins/profile/*/*.trace.json.gz, also readable in TensorBoard's or Perfetto's
profile viewers) holds one event per executed HLO instruction (fusions, matmuls, copies); each is
summed over the traced steps and named by the source operation that XLA's metadata gives it
(e.g. `transpose(jvp(...d,vd->...v))/dot_general`: the output head's matmul in the backward pass),
so a profile reads as "which part of the model costs what" rather than as fusion numbers.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

# Runtime bookkeeping events around the HLO instructions (executor, thread pool, Python).
_NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "end:", "PjitFunction", "PjRt",
            "CommonPjRtLoadedExecutable", "ParseArguments", "TfrtCpu", "Execute")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (result shape, source op_name) from a compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return out


def latest_trace(trace_dir: str | Path) -> Path:
    traces = sorted(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"))
    if not traces:
        raise ValueError(f"no profiler trace under {trace_dir} (expected "
                         "plugins/profile/*/*.trace.json.gz from jax.profiler).")
    return traces[-1]


def op_times(trace: str | Path, steps: int) -> dict[str, tuple[float, int]]:
    """HLO instruction -> (milliseconds per step, executions per step), from a trace of `steps`
    steps."""
    events = json.load(gzip.open(trace, "rt"))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
            total[e["name"]] += e["dur"]  # microseconds
            count[e["name"]] += 1
    return {n: (t / 1e3 / steps, count[n] // steps) for n, t in total.items()}


def table(trace_dir: str | Path, hlo_text: str, steps: int, top: int = 25) -> str:
    """The `top` most expensive instructions of the traced steps, one line each: ms per step, share
    of the ops' total, executions per step (a scanned layer's op runs once per layer), result
    shape and source operation."""
    times = op_times(latest_trace(trace_dir), steps)
    info = hlo_instructions(hlo_text)
    busy = sum(t for t, _ in times.values())
    lines = [f"per step: {busy:,.1f} ms in {len(times)} XLA operations; the {top} costliest:",
             f"{'ms':>8} {'share':>6} {'runs':>5}  {'operation':<34} {'shape':<30} source"]
    for name, (ms, runs) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        shape, source = info.get(name, ("", ""))
        source = re.sub(r"^jit\([^)]*\)/", "", source)
        lines.append(f"{ms:8.1f} {100 * ms / busy:5.1f}% {runs:5d}  {name[:34]:<34} "
                     f"{shape[:30]:<30} {source[-80:]}")
    return "\n".join(lines)
