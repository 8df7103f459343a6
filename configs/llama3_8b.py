"""LLaMA 3 8B: RoPE, RMSNorm, SwiGLU, no biases, untied output head (Meta 2024; grouped-query attention with 8 KV heads, RoPE theta 500000).

Published shape: d_model 4096, 32 layers, 32 heads (8 key/value heads), MLP 14336, context 8192,
vocabulary 128256: 8,030,261,248 parameters.

Train (FSDP over the devices, bfloat16 compute, full remat):
    python -m llmjax.main --config=configs/llama3_8b.py --workdir=/tmp/llama3_8b
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/llama3_8b.py:runlocal --workdir=/tmp/llama3_8b_local
"""

from llmjax.config import LLAMA_STYLE, base_config, llama_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **LLAMA_STYLE,
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_len=8192,
        rope_theta=500000.0,
    )
    llama_recipe(c, context=8192, learning_rate=0.0003)
    if arg.runlocal:
        runlocal(c)
    return c
