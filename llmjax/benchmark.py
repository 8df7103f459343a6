"""Measure a config's train step: tokens/s, MFU, step time, compile time, peak memory.

    python -m llmjax.benchmark --config=configs/gpt_small.py:runlocal --steps=10

Runs the real jitted train step (same sharding, donation and optimizer as training) on synthetic
token batches, so the figures do not depend on the data pipeline. Prints one readable summary and
one JSON line.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from llmjax import cli

STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")


def compiled_peak_bytes(compiled) -> int | None:
    """Arguments + outputs (less what donation aliases) + XLA's temporaries, per device."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def benchmark(config, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from llmjax import metrics, sharding
    from llmjax import steps as steps_lib

    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh.shape)
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps_lib.build(config, mesh)
        state = built.init()
        t0 = time.perf_counter()
        lowered = built.train_step.lower(state, steps_lib.abstract_batch(config, built))
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0

        # Synthetic batches of every key the family's step reads, at its lengths (an
        # encoder-decoder's decoder side is shorter); every position is a scored real token.
        rng = np.random.default_rng(0)
        local = {}
        for key, (rows, length) in steps_lib.batch_shapes(config, built.model_cfg).items():
            shape = (rows // jax.process_count(), length)
            if key in ("inputs", "targets", "decoder_inputs"):
                local[key] = rng.integers(0, built.model_cfg.vocab_size, shape, dtype=np.int32)
            elif key.endswith("positions"):
                local[key] = np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()
            else:  # segment ids and weights
                local[key] = np.ones(shape, np.int32)
        batch = sharding.global_batch(local, built.batch_sharding)
        for _ in range(warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)

    step_s = float(np.median(times))
    fpt = steps_lib.flops_per_token(built.model_cfg, config.seq_len,
                                   steps_lib.batch_shapes(config, built.model_cfg)["targets"][1])
    device = jax.devices()[0]
    peak = metrics.peak_flops_per_device(device, config.peak_flops_per_device)
    tokens_per_sec = config.batch_size * config.seq_len / step_s
    counts = steps_lib.count_params(built.model_cfg)
    return {
        "device": device.device_kind, "devices": jax.device_count(),
        "mesh": list(mesh.devices.shape), "params": counts["params"],
        "batch_size": config.batch_size, "seq_len": config.seq_len, "dtype": built.model_cfg.dtype,
        "remat": built.model_cfg.remat_policy,
        "compile_s": round(compile_s, 2), "step_time_ms": round(1e3 * step_s, 2),
        "step_time_ms_min": round(1e3 * min(times), 2),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu": round(metrics.mfu(tokens_per_sec, fpt, jax.device_count(), peak), 4),
        "peak_flops_per_device": peak, "flops_per_token": fpt,
        "peak_memory_bytes_per_device": compiled_peak_bytes(compiled),
    }


def main(argv):
    del argv
    config = cli.require_config()
    try:
        r = benchmark(config, STEPS.value, WARMUP.value)
    except ValueError as e:
        cli.fail(str(e))
    mem = r["peak_memory_bytes_per_device"]
    print(f"{r['device']} x{r['devices']} mesh {r['mesh']}: {r['params']:,} params, "
          f"batch {r['batch_size']}x{r['seq_len']} {r['dtype']}\n"
          f"  compile {r['compile_s']:.1f} s | step {r['step_time_ms']:.1f} ms | "
          f"{r['tokens_per_sec']:,.0f} tokens/s | MFU {100 * r['mfu']:.1f}% | "
          f"peak memory {mem / 2**20 if mem else float('nan'):,.1f} MiB/device")
    print(json.dumps(r))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
