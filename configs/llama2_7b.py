"""LLaMA 2 7B: RoPE, RMSNorm, SwiGLU, no biases, untied output head (Touvron et al. 2023).

Published shape: d_model 4096, 32 layers, 32 heads (32 key/value heads), MLP 11008, context 4096,
vocabulary 32000: 6,738,415,616 parameters.

Train (FSDP over the devices, bfloat16 compute, full remat):
    python -m llmjax.main --config=configs/llama2_7b.py --workdir=/tmp/llama2_7b
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/llama2_7b.py:runlocal --workdir=/tmp/llama2_7b_local

Planned for TPU v5p ahead of time (libtpu 0.0.42.1's compiler on a CPU machine, 2026-12):
    python -m llmjax.describe --config=configs/llama2_7b.py --topology=v5p-8 --config.microbatches=32
The recipe's 4M-token batch in one pass does not fit v5p-8 (4 chips): the compiler refuses ~1.1 TiB
of temporaries per chip. With 32 micro-batches it compiles (198 s on 2 shared CPU cores): per chip
6.3 GiB of parameters + 12.6 GiB of optimizer state (18.8 GiB of arguments) and 73.3 GiB of
temporaries, a 92.1 GiB peak of the 95.74 GiB the compiler allows.
"""

from llmjax.config import LLAMA_STYLE, base_config, llama_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **LLAMA_STYLE,
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        mlp_dim=11008,
        max_len=4096,
        rope_theta=10000.0,
    )
    llama_recipe(c, context=4096, learning_rate=0.0003)
    if arg.runlocal:
        runlocal(c)
    return c
