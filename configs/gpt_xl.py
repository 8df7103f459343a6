"""GPT-2 XL (1.5B): learned positions, LayerNorm with bias, GELU MLP, biases, tied embeddings.

Published shape: d_model 1600, 48 layers, 25 heads, context 1024, vocabulary 50257:
1,557,611,200 parameters.

Train (a TPU VM or GPU node; the mesh fills the devices, data-parallel first):
    python -m llmjax.main --config=configs/gpt_xl.py --workdir=/tmp/gpt_xl
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/gpt_xl.py:runlocal --workdir=/tmp/gpt_xl_local
"""

from llmjax.config import GPT2_STYLE, base_config, gpt2_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **GPT2_STYLE,
        vocab_size=50257,
        d_model=1600,
        num_layers=48,
        num_heads=25,
        mlp_dim=6400,
        max_len=1024,
    )
    gpt2_recipe(c, learning_rate=0.0002)
    if arg.runlocal:
        runlocal(c)
    return c
