"""LLaMA 2 70B: RoPE, RMSNorm, SwiGLU, no biases, untied output head (Touvron et al. 2023; grouped-query attention with 8 KV heads).

Published shape: d_model 8192, 80 layers, 64 heads (8 key/value heads), MLP 28672, context 4096,
vocabulary 32000: 68,976,648,192 parameters.

Train (FSDP over the devices, bfloat16 compute, full remat):
    python -m llmjax.main --config=configs/llama2_70b.py --workdir=/tmp/llama2_70b
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/llama2_70b.py:runlocal --workdir=/tmp/llama2_70b_local

Planned for TPU v5p ahead of time (`python -m llmjax.describe --config=configs/llama2_70b.py
--topology=v5p-64 --config.microbatches=32`; libtpu 0.0.42.1's compiler on a CPU machine, 2026-12):
- as configured (1024 x 4096 in one pass) the smallest v5p slice is v5p-512 (256 chips): per chip
  1.0 GiB of parameters + 2.0 GiB of optimizer state, 74.9 GiB of temporaries, a 77.9 GiB peak of
  95.74 GiB (compiled in 384 s on 2 shared CPU cores); v5p-256 is refused (112 GiB of temporaries).
- with micro-batches the smallest is v5p-64 (32 chips): 8.0 + 16.1 GiB of state; 32 micro-batches
  peak at 77.4 GiB (168 s), 16 at 95.0 GiB (0.7 GiB to spare). v5p-32 does not fit even at 64
  micro-batches (one sequence per chip: 48 GiB of state and 100 GiB of temporaries).
"""

from llmjax.config import LLAMA_STYLE, base_config, llama_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **LLAMA_STYLE,
        vocab_size=32000,
        d_model=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        mlp_dim=28672,
        max_len=4096,
        rope_theta=10000.0,
    )
    llama_recipe(c, context=4096, learning_rate=0.00015)
    if arg.runlocal:
        runlocal(c)
    return c
