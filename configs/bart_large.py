"""BART-large (406M): post-LN encoder-decoder with learned positions (offset 2), an embedding LayerNorm in
each stack, GELU, biases, a head tied to the shared token table and a final logits bias. Trained
by text infilling (30% of tokens in Poisson(3)-length spans, each span one <mask>) and sentence
(line) permutation.

Published shape: d_model 1024, 12 encoder + 12 decoder layers, 16 heads, MLP 4096, 1024 positions,
vocabulary 50,265: 406,291,456 parameters (Hugging Face's BartModel; its final_logits_bias is a
buffer, here a parameter reported in params but not in backbone_params).

Train:
    python -m llmjax.main --config=configs/bart_large.py --workdir=/tmp/bart_large
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/bart_large.py:runlocal --workdir=/tmp/bart_large_local
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(**presets.BART_STYLE, vocab_size=50265, d_model=1024, num_layers=12, num_heads=16,
                   mlp_dim=4096)
    presets.bart_recipe(c, learning_rate=4e-4)
    if arg.runlocal:
        presets.runlocal(c)
    return c
