"""Jurassic-1 Jumbo (AI21 Labs, 2021): a GPT-3-style decoder, shallower and wider: 76 layers x 13824.

Published shape (Lieber et al. 2021, "Jurassic-1: Technical details and evaluation"):
d_model 13824, 76 layers, 96 heads (of 144), context 2048, a 256k-entry vocabulary: about 178B
parameters (177,866,855,424 here: GPT-2-style blocks with learned positions and a tied head;
the paper does not list every block detail, so those follow GPT-3). The batch follows GPT-3
175B's 3.2M tokens (1536 x 2048), an assumption: the paper does not give it here.

Train on a TPU pod (FSDP over the slice, tensor parallel inside a host):
    python -m llmjax.main --config=configs/jurassic1_jumbo.py --workdir=gs://BUCKET/j1 \
        --config.mesh.shape="(1,-1,8)"
Plan the slice first (compiles the step for the slice on any machine; needs the `tpu` extra):
    python -m llmjax.describe --config=configs/jurassic1_jumbo.py --topology=v5p-2048
On a laptop CPU, the same architecture shrunk:
    python -m llmjax.main --config=configs/jurassic1_jumbo.py:runlocal --workdir=/tmp/j1_local

Planned for TPU v5p ahead of time (libtpu 0.0.42.1's compiler on a CPU machine, 2026-12; mesh
(1, -1, 8)):
- as configured (1536 x 2048 in one pass) the smallest v5p slice is v5p-2048 (1024 chips): per
  chip 0.7 GiB of parameters + 1.3 GiB of optimizer state (2.2 GiB of arguments, 0.17 GiB more
  than the shard shapes add up to: TPU layout padding, presumably of the 144-wide heads), 62.8 GiB
  of temporaries, a 65.0 GiB peak of 95.74 GiB (compiled in 347 s on 2 shared CPU cores);
  v5p-1024 is refused (120 GiB of temporaries per chip).
- with --config.microbatches=16 it fits v5p-256 (128 chips): 15.8 + 59.5 = 75.3 GiB (133 s; 8
  micro-batches need 110.6 GiB); with --config.microbatches=96 v5p-128 (64 chips): 31.5 + 58.8 =
  90.3 GiB (147 s; 24 micro-batches are refused). Shallower than GPT-3 175B (76 layers against
  96), it needs less activation memory at the same batch.
"""

from llmjax.config import GPT2_STYLE, base_config, gpt3_recipe, parse_arg, runlocal


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.model.update(
        **GPT2_STYLE,
        vocab_size=256000,
        d_model=13824,
        num_layers=76,
        num_heads=96,
        mlp_dim=4 * 13824,
        max_len=2048,
    )
    gpt3_recipe(c)  # GPT-3 175B's batch, schedule, remat and mesh
    if arg.runlocal:
        runlocal(c)
    return c
