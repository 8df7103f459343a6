"""BERT-large (335M): BERT-base's architecture at d_model 1024, 24 layers, 16 heads, MLP 4096:
335,141,888 parameters with the pooler (Hugging Face's BertModel).

Train:
    python -m llmjax.main --config=configs/bert_large.py --workdir=/tmp/bert_large
On a laptop CPU:
    python -m llmjax.main --config=configs/bert_large.py:runlocal --workdir=/tmp/bert_large_local
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(**presets.BERT_STYLE, vocab_size=30522, d_model=1024, num_layers=24,
                   num_heads=16, mlp_dim=4096)
    presets.bert_recipe(c)
    if arg.runlocal:
        presets.runlocal(c)
    return c
