"""GPT-2 large (774M): learned positions, LayerNorm with bias, GELU MLP, biases, tied embeddings.

Published shape: d_model 1280, 36 layers, 20 heads, context 1024, vocabulary 50257:
774,030,080 parameters.

Train (a TPU VM or GPU node; the mesh fills the devices, data-parallel first):
    python -m llmjax.main --config=configs/gpt_large.py --workdir=/tmp/gpt_large
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/gpt_large.py:runlocal --workdir=/tmp/gpt_large_local
"""

from llmjax.config import GPT2_STYLE, base_config, gpt2_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **GPT2_STYLE,
        vocab_size=50257,
        d_model=1280,
        num_layers=36,
        num_heads=20,
        mlp_dim=5120,
        max_len=1024,
    )
    gpt2_recipe(c, learning_rate=0.00025)
    if arg.runlocal:
        runlocal(c)
    return c
