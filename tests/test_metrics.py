"""JSONL/TensorBoard writer, console line, peak FLOP/s, FLOPs per token and MFU."""

import glob
import json
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import metrics


def read_jsonl(path):
    def reject(constant):  # strict JSON: NaN/Infinity tokens must never reach the file
        raise ValueError(f"non-standard JSON constant {constant}")
    with open(path) as f:
        return [json.loads(line, parse_constant=reject) for line in f]


def test_writer_appends_plain_json_lines(tmp_path):
    workdir = str(tmp_path / "run")
    writer = metrics.MetricWriter(workdir)
    writer.write(np.int64(10), {"loss": jnp.float32(2.5), "learning_rate": np.float64(1e-3),
                                "tokens": np.int32(4096), "ok": np.bool_(True), "name": "x"})
    # Flushed per write: the line is on disk before close (a killed run keeps it).
    [line] = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert list(line) == ["step", "loss", "learning_rate", "tokens", "ok", "name"]
    assert line == {"step": 10, "loss": 2.5, "learning_rate": 1e-3, "tokens": 4096, "ok": True,
                    "name": "x"}
    assert type(line["tokens"]) is int
    writer.close()

    # A resumed run appends to the same file.
    with metrics.MetricWriter(workdir) as writer:
        writer.write(20, {"eval_loss": 2.0})
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [l["step"] for l in lines] == [10, 20]


def test_non_finite_values_are_strings(tmp_path):
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.write(1, {"loss": float("nan"), "grad_norm": jnp.inf, "x": -np.inf})
    [line] = read_jsonl(tmp_path / "metrics.jsonl")
    assert line == {"step": 1, "loss": "nan", "grad_norm": "inf", "x": "-inf"}
    assert math.isinf(float(line["grad_norm"]))


def test_tensorboard_events(tmp_path):
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.write(1, {"loss": 3.0, "name": "not a scalar"})
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path / "run"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "run")


def test_format_line():
    record = {"loss": 3.41234, "learning_rate": 2.9e-4, "grad_norm": 0.8312,
              "tokens_per_sec": 41234.0, "mfu": 0.1234, "step_time_ms": 210.4}
    assert metrics.format_line(120, 1000, record) == (
        "step  120/1000 | loss 3.412 | lr 2.9e-04 | gnorm 0.83 | 41.2k tok/s | mfu 12.3% | "
        "210 ms/step")
    # Absent keys are skipped; unknown ones follow; jax scalars are fine.
    assert metrics.format_line(5, 1000, {"loss": jnp.float32(2.0), "accuracy": 0.41234}) == (
        "step    5/1000 | loss 2.000 | accuracy 0.4123")
    assert metrics.format_line(1000, 1000, {"eval_loss": 3.1, "eval_perplexity": 22.198}) == (
        "step 1000/1000 | eval_loss 3.100 | eval_ppl 22.20")
    assert metrics.format_line(7, None, {"tokens_per_sec": 1.5e6}) == "step 7 | 1.5M tok/s"


@pytest.mark.parametrize("kind, flops", [
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("TPU7x", 1153.5e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A10G", 70e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA B200", 2250e12),
])
def test_peak_table(kind, flops):
    device = SimpleNamespace(platform="gpu" if "NVIDIA" in kind else "tpu", device_kind=kind)
    assert metrics.peak_flops_per_device(device) == pytest.approx(flops)


def test_peak_override_and_unknown():
    gpu = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops_per_device(gpu, override=1e12) == 1e12
    assert metrics.peak_flops_per_device(gpu, override=0.0) == 989e12  # 0: not set
    unknown = SimpleNamespace(platform="gpu", device_kind="Imaginary X1")
    assert math.isnan(metrics.peak_flops_per_device(unknown))
    assert metrics.peak_flops_per_device(unknown, override=5e12) == 5e12


def test_cpu_peak_is_measured_and_shared_by_devices():
    cpu = jax.devices("cpu")[0]
    peak = metrics.peak_flops_per_device(cpu)
    assert peak > 0
    # Measured once per process, then split over the local CPU devices (fake ones share cores).
    assert metrics.cpu_matmul_flops() == metrics.cpu_matmul_flops()
    assert peak == pytest.approx(metrics.cpu_matmul_flops() / len(jax.local_devices(backend="cpu")))


def test_mfu_arithmetic():
    out = metrics.throughput(tokens_per_step=8192, step_seconds=0.5, flops_per_token=1e6,
                             num_devices=4, peak_flops=1e10)
    # 16384 tok/s * 1e6 FLOPs/token = 1.6384e10 FLOP/s over 4 devices of 1e10 each
    assert out == {"tokens_per_sec": 16384.0, "mfu": pytest.approx(0.4096)}
    assert metrics.mfu(16384.0, 1e6, 4, 1e10) == pytest.approx(0.4096)


def test_flops_per_token_gpt2_small():
    n = metrics.flops_per_token(non_embedding_params=85_056_000, vocab_size=50257, d_model=768,
                                num_layers=12, num_heads=12, head_dim=64, seq_len=1024)
    # 6 * (85,056,000 + 50,257 * 768) = 6 * 123,653,376 = 741,920,256
    # 12 * 12 layers * 12 heads * 64 * 1024 = 113,246,208
    assert n == 855_166_464
    assert type(n) is int
