"""Measure a config's train step: tokens/s, MFU, step time, compile time, peak memory.

    python -m llmjax.benchmark --config=configs/gpt_small.py:runlocal --steps=10
    python -m llmjax.benchmark --config=configs/gpt_small.py:bench_tiny --profile=/tmp/prof

Runs the real jitted train step (same sharding, donation and optimizer as training) on synthetic
token batches, so the figures do not depend on the data pipeline. Prints one readable summary and
one JSON line.

With --compare=torch it also builds the PyTorch reference step of the same GPT-2-style shape
(benchmarks/torch_gpt.py: same architecture, parameter count, AdamW, clipping and tokens), eager
and/or torch.compile'd (--torch_modes), on one device, compiles and warms every engine, then times
--rounds rounds of --steps steps, alternating the engines within each round in one process, and
prints each engine's median tokens/s and the ratio llmjax / torch:

    python -m llmjax.benchmark --config=configs/gpt_small.py:bench_tiny --compare=torch
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

from llmjax import cli

STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up); per round with --compare.")
WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
COMPARE = flags.DEFINE_enum("compare", None, ["torch"], "Also time the PyTorch reference step "
                            "(benchmarks/torch_gpt.py) of the same shape and print the ratio.")
ROUNDS = flags.DEFINE_integer("rounds", 3, "--compare: alternating rounds of --steps steps each.")
PROFILE = flags.DEFINE_string("profile", None, "Also trace --profile_steps steps with "
                              "jax.profiler into this directory and print the costliest XLA "
                              "operations (llmjax/op_profile.py).")
PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "--profile: steps to trace.")
TORCH_MODES = flags.DEFINE_list("torch_modes", ["eager", "compile"],
                                "--compare: the PyTorch modes to time (eager, compile).")

TORCH_REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_gpt.py"


def compiled_peak_bytes(compiled) -> int | None:
    """Arguments + outputs (less what donation aliases) + XLA's temporaries, per device."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


class LlmjaxStep:
    """The config's jitted train step, compiled, with its state and one synthetic batch;
    `time_steps(n)` runs n steps and returns the seconds of each (each waited for)."""

    def __init__(self, config, devices=None):
        import jax
        import numpy as np

        from llmjax import sharding
        from llmjax import steps as steps_lib

        jax.config.update("jax_threefry_partitionable", True)
        self.config = config
        self.mesh = sharding.mesh_from_config(config, devices)
        with sharding.use_mesh(self.mesh, config.sharding_rules):
            self.built = built = steps_lib.build(config, self.mesh)
            self.state = built.init()
            t0 = time.perf_counter()
            lowered = built.train_step.lower(self.state, steps_lib.abstract_batch(config, built))
            self.compiled = lowered.compile()
            self.compile_s = time.perf_counter() - t0

            # Synthetic batches of every key the family's step reads, at its lengths (an
            # encoder-decoder's decoder side is shorter); every position is a scored real token.
            rng = np.random.default_rng(0)
            self.local = local = {}
            for key, (rows, length, *rest) in steps_lib.batch_shapes(config, built.model_cfg).items():
                shape = (rows // jax.process_count(), length, *rest)
                if key == "images":  # multimodal: blank images
                    local[key] = np.zeros(shape, np.float32)
                elif key in ("inputs", "targets", "decoder_inputs"):
                    local[key] = rng.integers(0, built.model_cfg.vocab_size, shape, dtype=np.int32)
                elif key.endswith("positions"):
                    local[key] = np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()
                else:  # segment ids and weights
                    local[key] = np.ones(shape, np.int32)
            self.batch = sharding.global_batch(local, built.batch_sharding)

    def time_steps(self, n: int) -> list[float]:
        import jax
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.state, m = self.compiled(self.state, self.batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        return times


    def profile(self, trace_dir: str, n: int) -> str:
        """Traces n steps with jax.profiler into trace_dir; returns the per-operation table."""
        import jax

        from llmjax import op_profile
        jax.profiler.start_trace(trace_dir)
        try:
            self.time_steps(n)
        finally:
            jax.profiler.stop_trace()
        return op_profile.table(trace_dir, self.compiled.as_text(), n)


def benchmark(config, steps: int, warmup: int, profile_dir: str | None = None,
              profile_steps: int = 3) -> dict:
    import jax
    import numpy as np

    from llmjax import metrics
    from llmjax import steps as steps_lib

    engine = LlmjaxStep(config)
    built = engine.built
    engine.time_steps(warmup)
    times = engine.time_steps(steps)
    profile = engine.profile(profile_dir, profile_steps) if profile_dir else None

    step_s = float(np.median(times))
    fpt = steps_lib.flops_per_token(built.model_cfg, config.seq_len,
                                   steps_lib.batch_shapes(config, built.model_cfg)["targets"][1])
    device = jax.devices()[0]
    peak = metrics.peak_flops_per_device(device, config.peak_flops_per_device)
    tokens_per_sec = config.batch_size * config.seq_len / step_s
    counts = steps_lib.count_params(built.model_cfg)
    return {
        "device": device.device_kind, "devices": jax.device_count(),
        "mesh": list(engine.mesh.devices.shape), "params": counts["params"],
        "batch_size": config.batch_size, "seq_len": config.seq_len, "dtype": built.model_cfg.dtype,
        "remat": built.model_cfg.remat_policy,
        "compile_s": round(engine.compile_s, 2), "step_time_ms": round(1e3 * step_s, 2),
        "step_time_ms_min": round(1e3 * min(times), 2),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu": round(metrics.mfu(tokens_per_sec, fpt, jax.device_count(), peak), 4),
        "peak_flops_per_device": peak, "flops_per_token": fpt,
        "peak_memory_bytes_per_device": compiled_peak_bytes(engine.compiled),
        **({"profile": profile} if profile else {}),
    }


# ------------------------------------------------------------------------------------------------
# --compare=torch

TORCH_HINT = ("pip install -e '.[test]' (CPU torch; a CUDA build of torch to compare on an NVIDIA "
              "GPU)")


def load_torch_reference():
    """benchmarks/torch_gpt.py as a module (it lives beside the package, in the source tree)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError(f"--compare=torch needs PyTorch, which is not installed: {TORCH_HINT}.")
    if not TORCH_REFERENCE.is_file():
        raise ValueError(f"--compare=torch needs the PyTorch reference {TORCH_REFERENCE}, which "
                         "ships with a source checkout of llmjax; run from one (pip install -e .).")
    name = "llmjax_torch_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TORCH_REFERENCE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def torch_reference_kwargs(config) -> dict:
    """TorchGPT's arguments for the config's shape, optimizer and schedule; ValueError naming the
    first setting the GPT-2 reference cannot reproduce."""
    from llmjax.config import GPT2_STYLE
    from llmjax.models import ModelConfig
    from llmjax.optim import DEFAULT_NO_DECAY

    m = ModelConfig.from_config(config.model)
    o = config.optim
    # GPT-2's architecture; its LayerNorm eps is passed on, whatever it is.
    other = {f"model.{k}": getattr(m, k) for k, v in GPT2_STYLE.items()
             if k != "norm_eps" and getattr(m, k) != v}
    checks = [
        (m.family == "decoder", f"model.family={m.family!r} (the reference is a decoder)"),
        (not other, ", ".join(f"{k}={v!r}" for k, v in other.items())
         + " (the reference has learned positions, LayerNorm, GELU, biases and a tied head)"),
        (m.num_kv_heads == m.num_heads, "grouped-query attention (num_kv_heads != num_heads)"),
        (m.head_dim * m.num_heads == m.d_model, "head_dim * num_heads != d_model"),
        (m.dropout_rate == 0,
         f"model.dropout_rate={m.dropout_rate} (the reference has no dropout)"),
        (m.param_dtype == "float32", f"model.param_dtype={m.param_dtype!r} (float32 params)"),
        (m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r} (float32 or bfloat16)"),
        (config.microbatches == 1, f"microbatches={config.microbatches} (one batch a step)"),
        (o.get("name", "adamw") == "adamw",
         f"optim.name={o.get('name')!r} (the reference uses AdamW)"),
        (o.get("schedule", "cosine") in ("cosine", "constant"),
         f"optim.schedule={o.get('schedule')!r} (cosine or constant)"),
        (o.get("no_decay", DEFAULT_NO_DECAY) == DEFAULT_NO_DECAY,
         f"optim.no_decay={o.get('no_decay')!r} (the reference exempts {DEFAULT_NO_DECAY!r})"),
        (not o.get("freeze", ""), "optim.freeze (the reference trains every parameter)"),
        (o.get("mu_dtype", None) is None, "optim.mu_dtype (float32 moments)"),
        (config.get("fault_nonfinite_steps", ()) == (), "fault_nonfinite_steps"),
    ]
    for ok, what in checks:
        if not ok:
            raise ValueError(f"--compare=torch reproduces GPT-2-style decoders only, and this "
                             f"config has {what}; benchmark it without --compare.")
    constant = o.get("schedule", "cosine") == "constant"
    return dict(d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
                mlp_dim=m.mlp_dim, vocab_size=m.vocab_size, seq_len=config.seq_len,
                batch_size=config.batch_size, max_len=m.max_len, dtype=m.dtype,
                norm_eps=m.norm_eps, init_std=m.init_std, seed=config.seed,
                learning_rate=o.get("learning_rate", 3e-4),
                warmup_steps=int(o.get("warmup_steps", 0)), total_steps=config.total_steps,
                min_lr_ratio=1.0 if constant else o.get("min_lr_ratio", 0.1),
                b1=o.get("b1", 0.9), b2=o.get("b2", 0.95), eps=o.get("eps", 1e-8),
                weight_decay=o.get("weight_decay", 0.1),
                grad_clip_norm=o.get("grad_clip_norm", 1.0) or 0.0)


def compare(config, steps: int, warmup: int, rounds: int,
            torch_modes=("eager", "compile")) -> dict:
    """llmjax's step against the PyTorch reference's, alternating timed rounds on one device."""
    import jax

    from llmjax import steps as steps_lib

    modes = tuple(torch_modes)
    if not modes or any(mode not in ("eager", "compile") for mode in modes):
        raise ValueError(f"--torch_modes={','.join(modes)} must list eager and/or compile.")
    if steps < 1 or rounds < 1:
        raise ValueError(f"--steps={steps} and --rounds={rounds} must be at least 1.")
    kwargs = torch_reference_kwargs(config)
    if any(int(s) > 1 for s in config.mesh.shape):
        raise ValueError(f"--compare=torch times one device against one device; mesh.shape "
                         f"{tuple(config.mesh.shape)} asks for more: leave it at (-1, 1, 1).")
    backend = jax.default_backend()
    torch_gpt = load_torch_reference()
    import torch
    if backend == "gpu":
        if not torch.cuda.is_available():
            raise ValueError(f"JAX runs on the GPU but this torch ({torch.__version__}) has no "
                             "CUDA; install a CUDA build of torch to compare on the GPU.")
        device = "cuda"
    elif backend == "cpu":
        device = "cpu"
    else:
        raise ValueError(f"--compare=torch runs on a CPU or an NVIDIA GPU, not on {backend!r}.")

    engines = {"llmjax": LlmjaxStep(config, jax.devices()[:1])}
    jax_engine = engines["llmjax"]
    warm = {"llmjax": jax_engine.compile_s}
    for mode in modes:
        engine = torch_gpt.TorchGPT(**kwargs, mode=mode, device=device)
        # The very tokens llmjax trains on.
        engine.set_batch(jax_engine.local["inputs"], jax_engine.local["targets"])
        engines[f"torch {mode}"] = engine
    counts = steps_lib.count_params(jax_engine.built.model_cfg)
    for name, engine in engines.items():
        if name != "llmjax" and engine.num_params() != counts["params"]:
            raise AssertionError(f"{name} has {engine.num_params():,} parameters, llmjax "
                                 f"{counts['params']:,}: the reference no longer matches.")
    # Compilation (llmjax: above; torch.compile: in its first step) and warm-up, untimed.
    for name, engine in engines.items():
        t0 = time.perf_counter()
        engine.time_steps(max(warmup, 1))
        warm[name] = warm.get(name, 0.0) + time.perf_counter() - t0

    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            times[name].extend(engine.time_steps(steps))

    tokens = config.batch_size * config.seq_len
    results = {}
    for name, engine in engines.items():
        step_s = statistics.median(times[name])
        per_round = [statistics.median(times[name][r * steps:(r + 1) * steps])
                     for r in range(rounds)]
        results[name] = {
            "warmup_s": round(warm[name], 2), "step_time_ms": round(1e3 * step_s, 2),
            "step_time_ms_min": round(1e3 * min(times[name]), 2),
            "tokens_per_sec": round(tokens / step_s, 1),
            "tokens_per_sec_rounds": [round(tokens / s, 1) for s in per_round]}
    ratios = {mode: round(results["llmjax"]["tokens_per_sec"]
                          / results[f"torch {mode}"]["tokens_per_sec"], 3) for mode in modes}
    # CUDA: torch's own peak allocation per engine; on a CPU only the process's peak RSS (all
    # engines together) is known.
    peak_torch = ({f"torch {mode}": engines[f"torch {mode}"].peak_memory_bytes() for mode in modes}
                  if device == "cuda" else None)
    return {
        "compare": "torch", "device": jax.devices()[0].device_kind, "torch_device": device,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "params": counts["params"], "batch_size": config.batch_size, "seq_len": config.seq_len,
        "dtype": kwargs["dtype"], "rounds": rounds, "steps": steps, "engines": results,
        "ratios": ratios,
        "llmjax_peak_memory_bytes": compiled_peak_bytes(jax_engine.compiled),
        "torch_peak_memory_bytes": peak_torch, "process_peak_rss_bytes": torch_gpt.peak_rss_bytes(),
    }


def print_compare(r: dict):
    print(f"{r['device']} (torch {r['torch']} on {r['torch_device']}, {r['torch_threads']} "
          f"threads): {r['params']:,} params, batch {r['batch_size']}x{r['seq_len']} {r['dtype']}, "
          f"{r['rounds']} alternating rounds of {r['steps']} steps")
    for name, e in r["engines"].items():
        mode = name.split(" ")[-1]
        ratio = "" if name == "llmjax" else f" | llmjax/torch {r['ratios'][mode]:.2f}x"
        print(f"  {name:<14} compile + warm-up {e['warmup_s']:6.1f} s | "
              f"step {e['step_time_ms']:8.1f} ms | {e['tokens_per_sec']:>10,.0f} tokens/s{ratio}")
    print(json.dumps(r))


def main(argv):
    del argv
    config = cli.require_config()
    if PROFILE.value is None and PROFILE_STEPS.present:
        cli.fail("--profile_steps applies only with --profile=DIR; add --profile=DIR.")
    if COMPARE.value and PROFILE.value:
        cli.fail("--profile traces llmjax's step alone; run it without --compare.")
    if COMPARE.value:
        # JAX would otherwise take 75% of the GPU's memory up front, leaving torch little.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            r = compare(config, STEPS.value, WARMUP.value, ROUNDS.value, TORCH_MODES.value)
        except ValueError as e:
            cli.fail(str(e))
        print_compare(r)
        return
    try:
        r = benchmark(config, STEPS.value, WARMUP.value, PROFILE.value, PROFILE_STEPS.value)
    except ValueError as e:
        cli.fail(str(e))
    profile = r.pop("profile", None)
    if profile:
        print(profile + f"\n(trace: {PROFILE.value}; TensorBoard's profile plugin or "
              "ui.perfetto.dev show it on a timeline)\n")
    mem = r["peak_memory_bytes_per_device"]
    print(f"{r['device']} x{r['devices']} mesh {r['mesh']}: {r['params']:,} params, "
          f"batch {r['batch_size']}x{r['seq_len']} {r['dtype']}\n"
          f"  compile {r['compile_s']:.1f} s | step {r['step_time_ms']:.1f} ms | "
          f"{r['tokens_per_sec']:,.0f} tokens/s | MFU {100 * r['mfu']:.1f}% | "
          f"peak memory {mem / 2**20 if mem else float('nan'):,.1f} MiB/device")
    print(json.dumps(r))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
