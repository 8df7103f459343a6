"""Sequence classification with BERT (or RoBERTa): which standard-library package a docstring
is from (8 labels: llmjax.data.tasks.MODULES).

The task ships with llmjax (llmjax/data/tasks.py builds it offline from the stdlib) as JSONL
{"text": <docstring paragraph>, "label": "asyncio"}; the model reads [bos] + text + [eos] and a
new head (the pooled first token, dropout, a Linear to 8 labels) predicts the package.
`eval_accuracy` is the share of the 196 validation docstrings classified right. The model
section equals configs/bert_base.py's (roberta_base.py's with `:roberta`), so `init_from` can
point at that config's run: its backbone is loaded, the head starts fresh, the MLM head is left
on disk. Without init_from the same run trains from scratch.

On a laptop CPU (the task is built on first use; pretrain a few minutes, fine-tune ~2 minutes):
    python -m llmjax.main --config=configs/bert_base.py:runlocal --workdir=/tmp/bert_local \\
        --config.total_steps=300
    python -m llmjax.main --config=configs/classify_stdlib_modules.py:runlocal \\
        --workdir=/tmp/classify_local --config.init_from=/tmp/bert_local
    python -m llmjax.evaluation.stdlib_modules --workdir=/tmp/classify_local  # vs majority class
Measured: see docs/finetuning.md, "Encoders and encoder-decoders".
"""

from llmjax.config import base_config, parse_arg
from llmjax.data.tasks import MODULES
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, roberta=False, init_from="")
    c = base_config()
    if arg.roberta:
        c.model.update(**presets.ROBERTA_STYLE, vocab_size=50265, d_model=768, num_layers=12,
                       num_heads=12, mlp_dim=3072)
        presets.roberta_recipe(c, learning_rate=6e-4, warmup_steps=24_000)
    else:
        c.model.update(**presets.BERT_STYLE, vocab_size=30522, d_model=768, num_layers=12,
                       num_heads=12, mlp_dim=3072)
        presets.bert_recipe(c)
    if arg.runlocal:
        presets.runlocal(c)
    c.init_from = arg.init_from
    c.data.task = "classification"
    c.data.name = "stdlib_modules"
    c.data.labels = MODULES
    c.model.num_labels = len(MODULES)
    c.model.dropout_rate = 0.1  # BERT's fine-tuning dropout (compute-only: init_from allows it)
    c.seq_len = 64  # a paragraph is at most 200 characters; a longer one loses its end
    c.batch_size = 32
    c.total_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.eval_steps = 7  # 224 rows: the whole validation split (196 examples)
    c.checkpoint_every_steps = 300
    c.optim.update(learning_rate=1e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01,
                   min_lr_ratio=0.0)
    return c
