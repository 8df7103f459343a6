"""GPT-2 small (124M): learned positions, LayerNorm with bias, GELU MLP, biases, tied embeddings.

Published shape: d_model 768, 12 layers, 12 heads, context 1024, vocabulary 50257:
124,439,808 parameters.

Train (a TPU VM or GPU node; the mesh fills the devices, data-parallel first):
    python -m llmjax.main --config=configs/gpt_small.py --workdir=/tmp/gpt_small
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/gpt_small.py:runlocal --workdir=/tmp/gpt_small_local
OpenWebText-scale corpora reach val loss ~2.9 after ~600k steps of 0.5M tokens (published
GPT-2 replications). On the stdlib corpus (hygiene on: 715 training documents), :runlocal (bash
scripts/train.sh) measured 2026-12-07 on 2 Intel CPU cores: eval loss 3.51 (perplexity 33) after
its 1000 steps, 10.6k-11.8k tokens/s (2026-12-02, AMD: 9k-12.5k), 3.5 minutes; its curves:
docs/main_job_curves.png; its scores on the shipped evaluation tasks: docs/evaluation.md.

Benchmark the train step against the PyTorch reference of the same shape (benchmarks/torch_gpt.py;
eager and torch.compile, alternating rounds in one process, ratio llmjax/torch; docs/performance.md):
    python -m llmjax.benchmark --config=configs/gpt_small.py:bench_tiny --compare=torch
    python -m llmjax.benchmark --config=configs/gpt_small.py:bench_tiny --compare=torch \
        --config.model.dtype=bfloat16
    python -m llmjax.benchmark --config=configs/gpt_small.py --compare=torch --config.batch_size=4
    python -m llmjax.benchmark --config=configs/gpt_small.py --compare=torch --config.batch_size=4 \
        --config.model.dtype=bfloat16
:bench_tiny is a 5.3M-parameter GPT-2 (4 layers, d_model 256, 4 heads, MLP 1024, vocabulary
8192) on batches of 8 x 256 tokens, float32, remat 'minimal', loss_chunk 64.
Measured 2026-12-07 on 2 Intel Xeon cores (AMX), llmjax / PyTorch 2.13 alternating: tiny float32
3,556 tokens/s (0.78x eager, 0.70x torch.compile), bfloat16 6,115 (0.65x torch.compile's 9,445);
GPT-2 small at batch 4 x 1024 with --config.model.remat_policy=minimal --config.loss_chunk=256:
float32 158 tokens/s (0.68x torch.compile), bfloat16 241 (0.33x: PyTorch's AMX bfloat16 reaches
722). docs/performance.md has the table and what limits it.
"""

from llmjax.config import GPT2_STYLE, base_config, gpt2_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, bench_tiny=False)
    c = base_config()
    c.model.update(
        **GPT2_STYLE,
        vocab_size=50257,
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        max_len=1024,
    )
    gpt2_recipe(c, learning_rate=0.0006)
    if arg.runlocal:
        runlocal(c)
    if arg.bench_tiny:  # the small benchmark workload (see the docstring)
        c.model.update(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, vocab_size=8192,
                       max_len=256, dtype="float32", remat_policy="minimal")
        c.seq_len, c.batch_size = 256, 8
        c.loss_chunk = 64  # the fused chunked loss: 1.05x (float32) and 1.17x (bfloat16) here
    return c
