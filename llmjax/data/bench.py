"""Measure a config's input pipeline alone: batches/s and tokens/s, next to the train step's.

    python -m llmjax.data.bench --config=configs/gpt_small.py:runlocal --steps=200 --compare_step
    python -m llmjax.data.bench --config=configs/gpt_small.py:runlocal \
        --config.data.name=prepared --config.data.data_dir=DIR --compare_step

Builds the very iterator train.py builds (finetune.pipeline_for, same tokenizer, seed, batch size
and data.num_workers), pulls --warmup batches untimed (worker start-up, first reads), then times
--steps batches. Tokens are the batch's scored targets (weights), the same count the train step
consumes. --compare_step also times the config's jitted train step on synthetic batches
(llmjax.benchmark) and prints the ratio pipeline / step, which the pipeline should keep above 10.
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app, flags

from llmjax import benchmark
from llmjax import cli

# --steps (timed batches) and --warmup (untimed batches first) are llmjax.benchmark's flags.
STEPS, WARMUP = benchmark.STEPS, benchmark.WARMUP
WORKDIR = flags.DEFINE_string("workdir", None, "Where a trained tokenizer is kept (default: a "
                              "temporary folder; reuse one to skip training it again).")
COMPARE_STEP = flags.DEFINE_bool("compare_step", False, "Also time the train step and print the "
                                 "ratio of pipeline tokens/s to step tokens/s.")
STEP_STEPS = flags.DEFINE_integer("step_steps", 5, "--compare_step: timed train steps.")


def bench_pipeline(config, steps: int, warmup: int, workdir: str) -> dict:
    """Batches/s and tokens/s of the config's training iterator in this process."""
    import numpy as np

    from llmjax import data as data_lib
    from llmjax.data import finetune

    t0 = time.perf_counter()
    tokenizer = data_lib.load_or_train_tokenizer(finetune.tokenizer_data(config.data),
                                                 config.model.vocab_size, workdir)
    make_train_iterator, _ = finetune.pipeline_for(config.data)
    it = make_train_iterator(config.data, tokenizer, seed=config.seed, seq_len=config.seq_len,
                             batch_size=config.batch_size, process_index=0, process_count=1)
    for _ in range(warmup):
        next(it)
    ready_s = time.perf_counter() - t0
    tokens, t = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        tokens += int(np.sum(batch.get("weights", batch["targets"] != 0) != 0))
    elapsed = time.perf_counter() - t
    return {"data": config.data.get("name", "stdlib"), "num_workers":
            int(config.data.get("num_workers", 0)), "batch_size": config.batch_size,
            "seq_len": config.seq_len, "steps": steps, "startup_s": round(ready_s, 2),
            "batches_per_sec": round(steps / elapsed, 2), "tokens_per_sec": round(tokens / elapsed, 1)}


def main(argv):
    del argv
    config = cli.require_config()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_pipeline(config, STEPS.value, WARMUP.value, WORKDIR.value or tmp)
        print(f"pipeline ({r['data']}, {r['num_workers']} workers, batch {r['batch_size']}x"
              f"{r['seq_len']}): {r['batches_per_sec']:,.1f} batches/s | "
              f"{r['tokens_per_sec']:,.0f} tokens/s (ready after {r['startup_s']:.1f}s)")
        if COMPARE_STEP.value:
            step = benchmark.benchmark(config, STEP_STEPS.value, warmup=2)
            r["step_tokens_per_sec"] = step["tokens_per_sec"]
            r["ratio"] = round(r["tokens_per_sec"] / step["tokens_per_sec"], 2)
            print(f"train step ({step['device']} x{step['devices']}): "
                  f"{step['tokens_per_sec']:,.0f} tokens/s | pipeline / step = {r['ratio']:.1f}x"
                  + ("" if r["ratio"] >= 10 else " (below 10x: raise data.num_workers or prepare "
                     "the corpus once)"))
    except ValueError as e:
        cli.fail(str(e))
    print(json.dumps(r))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
