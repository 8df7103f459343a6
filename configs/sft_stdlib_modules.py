"""Supervised fine-tuning of GPT-2 small: name the standard-library package a docstring is from.

The task ships with llmjax (llmjax/data/tasks.py builds it offline from the stdlib): prompts
"Docstring: <text>\\nModule:", responses " asyncio", " email", ... (8 packages); the loss and the
accuracy score the response tokens only. The model section equals configs/gpt_small.py's, so
`init_from` can point at a gpt_small run (or a converted GPT-2 checkpoint with its tokenizer).

On a laptop CPU (pretrain a few minutes, then fine-tune ~1 minute):
    python -m llmjax.main --config=configs/gpt_small.py:runlocal --workdir=/tmp/gpt_small_local
    python -m llmjax.main --config=configs/sft_stdlib_modules.py:runlocal --workdir=/tmp/sft_local \\
        --config.init_from=/tmp/gpt_small_local
    python -m llmjax.evaluation.stdlib_modules --workdir=/tmp/sft_local  # exact match vs majority
Measured (2 CPU cores, 2026-11; pretrained 400 steps of gpt_small:runlocal, eval loss 4.17):
response-token eval loss 6.98 at step 0 (the pretrained model) -> 0.25 after 300 steps (unigram
baseline 2.86); exact-match accuracy on the 196 validation docstrings 0% -> 74.5% (majority class
10.7%; the same 300 steps from a random init: 70.9%).
"""

from llmjax.config import GPT2_STYLE, base_config, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, init_from="")
    c = base_config()
    c.model.update(**GPT2_STYLE, vocab_size=50257, d_model=768, num_layers=12, num_heads=12,
                   mlp_dim=3072, max_len=1024)
    c.seq_len, c.batch_size = 128, 32
    if arg.runlocal:
        runlocal(c)
    c.init_from = arg.init_from
    c.data.task = "sft"
    c.data.name = "stdlib_modules"
    c.seq_len = 128  # a docstring paragraph is at most 200 characters
    c.batch_size = 16
    c.total_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.eval_steps = 16  # 256 rows: the whole validation split (196 examples)
    c.checkpoint_every_steps = 300
    c.optim.update(learning_rate=1e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0)
    c.sample.update(prompt="Docstring: Create a TCP connection to host and port.\nModule:",
                    max_new_tokens=4, temperature=0.0)
    return c
