"""LLaMA 2 70B: RoPE, RMSNorm, SwiGLU, no biases, untied output head (Touvron et al. 2023; grouped-query attention with 8 KV heads).

Published shape: d_model 8192, 80 layers, 64 heads (8 key/value heads), MLP 28672, context 4096,
vocabulary 32000: 68,976,648,192 parameters.

Train (FSDP over the devices, bfloat16 compute, full remat):
    python -m llmjax.main --config=configs/llama2_70b.py --workdir=/tmp/llama2_70b
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/llama2_70b.py:runlocal --workdir=/tmp/llama2_70b_local
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
