"""RoBERTa-base (125M): BERT-base's architecture with a 50,265-piece byte-level vocabulary, 514
position rows (offset 2), one token type; dynamic masking, large batches, no next-sentence task.

Published shape: 124,645,632 parameters with the pooler (Hugging Face's RobertaModel).

Train:
    python -m llmjax.main --config=configs/roberta_base.py --workdir=/tmp/roberta_base
On a laptop CPU:
    python -m llmjax.main --config=configs/roberta_base.py:runlocal --workdir=/tmp/roberta_base_local
Measured (2 shared CPU cores, 600 steps, ~7.5 min): eval loss 7.65 at step 0 -> 5.60 (unigram
baseline 5.83), masked-token accuracy 11.1%.
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(**presets.ROBERTA_STYLE, vocab_size=50265, d_model=768, num_layers=12,
                   num_heads=12, mlp_dim=3072)
    presets.roberta_recipe(c, learning_rate=6e-4, warmup_steps=24_000)
    if arg.runlocal:
        presets.runlocal(c)
    return c
