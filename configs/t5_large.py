"""T5-large (770M): encoder-decoder with pre-RMSNorm blocks, no biases, T5 relative position buckets
(32 buckets up to distance 128, one table per stack) and unscaled attention logits. Trained by
span corruption (noise density 0.15, mean span 3, one sentinel per span).

Published shape: d_model 1024, 24 encoder + 24 decoder layers, 16 heads of 64, MLP 4096, vocabulary
32,128: 737,668,096 parameters (Hugging Face's T5ForConditionalGeneration).

Train:
    python -m llmjax.main --config=configs/t5_large.py --workdir=/tmp/t5_large
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/t5_large.py:runlocal --workdir=/tmp/t5_large_local
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(**presets.T5_STYLE, vocab_size=32128, d_model=1024, num_layers=24, num_heads=16,
                   head_dim=64, mlp_dim=4096)
    presets.t5_recipe(c)
    if arg.runlocal:
        presets.runlocal(c)
    return c
