"""GPT-2 small (124M): learned positions, LayerNorm with bias, GELU MLP, biases, tied embeddings.

Published shape: d_model 768, 12 layers, 12 heads, context 1024, vocabulary 50257:
124,439,808 parameters.

Train (a TPU VM or GPU node; the mesh fills the devices, data-parallel first):
    python -m llmjax.main --config=configs/gpt_small.py --workdir=/tmp/gpt_small
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/gpt_small.py:runlocal --workdir=/tmp/gpt_small_local
OpenWebText-scale corpora reach val loss ~2.9 after ~600k steps of 0.5M tokens; on the stdlib corpus :runlocal reaches eval loss ~2 in minutes
"""

from llmjax.config import GPT2_STYLE, base_config, gpt2_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
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
    return c
