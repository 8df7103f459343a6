"""The tiny run the reliability tests train, kill and restart (seconds on a CPU):

    python -m llmjax.main --config=tests/reliability_config.py --workdir=/tmp/r \
        --config.data.tokenizer=/path/tokenizer.model
"""

from tests.helpers import tiny_config


def get_config(arg=None):
    del arg
    return tiny_config("llama", **{
        "model.vocab_size": 512, "total_steps": 6, "log_every_steps": 1,
        "eval_every_steps": 1000, "eval_steps": 1, "checkpoint_every_steps": 2,
        "sample.max_new_tokens": 0, "batch_size": 8, "seq_len": 32, "model.max_len": 64,
        "optim.warmup_steps": 2, "mesh.shape": (-1, 1, 1),
        "peak_flops_per_device": 1e11})  # a given peak: no matmul is measured at start-up
