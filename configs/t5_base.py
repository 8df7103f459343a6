"""T5-base (220M): encoder-decoder with pre-RMSNorm blocks, no biases, T5 relative position buckets
(32 buckets up to distance 128, one table per stack) and unscaled attention logits. Trained by
span corruption (noise density 0.15, mean span 3, one sentinel per span).

Published shape: d_model 768, 12 encoder + 12 decoder layers, 12 heads of 64, MLP 3072, vocabulary
32,128: 222,903,552 parameters (Hugging Face's T5ForConditionalGeneration).

Train:
    python -m llmjax.main --config=configs/t5_base.py --workdir=/tmp/t5_base
On a laptop CPU, the same architecture shrunk to run in minutes:
    python -m llmjax.main --config=configs/t5_base.py:runlocal --workdir=/tmp/t5_base_local
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(**presets.T5_STYLE, vocab_size=32128, d_model=768, num_layers=12, num_heads=12,
                   head_dim=64, mlp_dim=3072)
    presets.t5_recipe(c)
    if arg.runlocal:
        presets.runlocal(c)
    return c
