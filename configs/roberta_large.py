"""RoBERTa-large (355M): d_model 1024, 24 layers, 16 heads, MLP 4096: 355,359,744 parameters with
the pooler (Hugging Face's RobertaModel).

Train:
    python -m llmjax.main --config=configs/roberta_large.py --workdir=/tmp/roberta_large
On a laptop CPU:
    python -m llmjax.main --config=configs/roberta_large.py:runlocal --workdir=/tmp/roberta_large_local
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(**presets.ROBERTA_STYLE, vocab_size=50265, d_model=1024, num_layers=24,
                   num_heads=16, mlp_dim=4096)
    presets.roberta_recipe(c, learning_rate=4e-4, warmup_steps=30_000)
    if arg.runlocal:
        presets.runlocal(c)
    return c
