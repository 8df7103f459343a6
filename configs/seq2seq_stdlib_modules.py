"""Seq2seq fine-tuning of T5-small: answer with the standard-library package a docstring is
from, as text ("asyncio", "email", ...: 8 packages, llmjax.data.tasks.MODULES).

The task ships with llmjax (llmjax/data/tasks.py builds it offline from the stdlib) as JSONL
{"input": <docstring paragraph>, "target": "asyncio"}; the encoder reads the paragraph + eos,
the decoder is scored on the target's tokens and its eos. `eval_accuracy` is the token accuracy
on the targets; `python -m llmjax.evaluation.stdlib_modules --workdir=DIR` prints the exact
match of the whole answer (teacher forcing: every target token the argmax, exactly when greedy
decoding would write it) next to the majority-class baseline. The model section equals
configs/t5_small.py's (`:bart` for configs/bart_base.py's), so `init_from` can point at that
config's run.

On a laptop CPU (the task is built on first use; pretrain a few minutes, fine-tune ~2 minutes):
    python -m llmjax.main --config=configs/t5_small.py:runlocal --workdir=/tmp/t5_local \\
        --config.total_steps=300
    python -m llmjax.main --config=configs/seq2seq_stdlib_modules.py:runlocal \\
        --workdir=/tmp/seq2seq_local --config.init_from=/tmp/t5_local
    python -m llmjax.evaluation.stdlib_modules --workdir=/tmp/seq2seq_local   # exact match vs majority
Measured: see docs/finetuning.md, "Encoders and encoder-decoders".
"""

from llmjax.config import base_config, parse_arg
from llmjax.models import presets


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, bart=False, init_from="")
    c = base_config()
    if arg.bart:
        c.model.update(**presets.BART_STYLE, vocab_size=50265, d_model=768, num_layers=6,
                       num_heads=12, mlp_dim=3072)
        presets.bart_recipe(c, learning_rate=4e-4)
    else:
        c.model.update(**presets.T5_STYLE, vocab_size=32128, d_model=512, num_layers=6,
                       num_heads=8, head_dim=64, mlp_dim=2048)
        presets.t5_recipe(c)
    if arg.runlocal:
        presets.runlocal(c)
    c.init_from = arg.init_from
    # T5 fine-tunes with dropout 0.1; these tiny models learned no better with it.
    c.model.dropout_rate = 0.0
    c.data.task = "seq2seq"
    c.data.name = "stdlib_modules"
    c.seq_len = 64  # a paragraph is at most 200 characters; a longer one loses its end
    c.data.target_len = 8  # a package name and the eos
    c.batch_size = 32
    c.total_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.eval_steps = 7  # 224 rows: the whole validation split (196 examples)
    c.checkpoint_every_steps = 300
    c.optim.update(name="adamw", learning_rate=1e-3, b2=0.98, warmup_steps=30, schedule="cosine",
                   weight_decay=0.01, min_lr_ratio=0.0)
    return c
