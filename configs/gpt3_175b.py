"""GPT-3 175B: the GPT-2 architecture at 96 layers x 12288 wide, context 2048.

Published shape (Brown et al. 2020, table 2.1): d_model 12288, 96 layers, 96 heads of 128,
context 2048, vocabulary 50257: 175B parameters (174,604,259,328 here, dense attention in every
layer; the paper's alternating locally banded sparse layers change no parameter).

Train on a TPU pod (FSDP over the slice, tensor parallel inside a host):
    python -m llmjax.main --config=configs/gpt3_175b.py --workdir=gs://BUCKET/gpt3 \
        --config.mesh.shape="(1,-1,8)"
On a laptop CPU, the same architecture shrunk:
    python -m llmjax.main --config=configs/gpt3_175b.py:runlocal --workdir=/tmp/gpt3_local

Planned for TPU v5p ahead of time (`python -m llmjax.describe --config=configs/gpt3_175b.py
--topology=v5p-2048`; libtpu 0.0.42.1's compiler on a CPU machine, 2026-12; mesh (1, -1, 8)):
- as configured (1536 x 2048 in one pass) the smallest v5p slice is v5p-2048 (1024 chips): per
  chip 0.7 GiB of parameters + 1.3 GiB of optimizer state, 75.2 GiB of temporaries, a 77.2 GiB
  peak of 95.74 GiB (compiled in 109 s); v5p-1024 is refused (128 GiB of temporaries per chip).
- with --config.microbatches=12 it fits v5p-256 (128 chips): 15.7 GiB of arguments + 76.9 GiB of
  temporaries = 92.7 GiB (101 s); with --config.microbatches=64 v5p-128 (64 chips) just fits:
  31.3 + 64.1 = 95.4 GiB, 0.3 GiB to spare (118 s; 32 micro-batches there need 118 GiB).
"""

from llmjax.config import GPT2_STYLE, base_config, gpt3_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **GPT2_STYLE,
        vocab_size=50257,
        d_model=12288,
        num_layers=96,
        num_heads=96,
        mlp_dim=49152,
        max_len=2048,
    )
    gpt3_recipe(c)  # GPT-3 175B's batch, schedule, remat and mesh
    if arg.runlocal:
        runlocal(c)
    return c
