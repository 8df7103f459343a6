"""LLaMA 2 13B: RoPE, RMSNorm, SwiGLU, no biases, untied output head (Touvron et al. 2023).

Published shape: d_model 5120, 40 layers, 40 heads (40 key/value heads), MLP 13824, context 4096,
vocabulary 32000: 13,015,864,320 parameters.

Train (FSDP over the devices, bfloat16 compute, full remat):
    python -m llmjax.main --config=configs/llama2_13b.py --workdir=/tmp/llama2_13b
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/llama2_13b.py:runlocal --workdir=/tmp/llama2_13b_local
"""

from llmjax.config import LLAMA_STYLE, base_config, llama_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **LLAMA_STYLE,
        vocab_size=32000,
        d_model=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        mlp_dim=13824,
        max_len=4096,
        rope_theta=10000.0,
    )
    llama_recipe(c, context=4096, learning_rate=0.0003)
    if arg.runlocal:
        runlocal(c)
    return c
