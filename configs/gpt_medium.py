"""GPT-2 medium (355M): learned positions, LayerNorm with bias, GELU MLP, biases, tied embeddings.

Published shape: d_model 1024, 24 layers, 16 heads, context 1024, vocabulary 50257:
354,823,168 parameters.

Train (a TPU VM or GPU node; the mesh fills the devices, data-parallel first):
    python -m llmjax.main --config=configs/gpt_medium.py --workdir=/tmp/gpt_medium
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/gpt_medium.py:runlocal --workdir=/tmp/gpt_medium_local
"""

from llmjax.config import GPT2_STYLE, base_config, gpt2_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **GPT2_STYLE,
        vocab_size=50257,
        d_model=1024,
        num_layers=24,
        num_heads=16,
        mlp_dim=4096,
        max_len=1024,
    )
    gpt2_recipe(c, learning_rate=0.0003)
    if arg.runlocal:
        runlocal(c)
    return c
