"""Small configs and synthetic batches shared by the trainer tests."""

import numpy as np

from llmjax.config import apply_overrides, base_config  # noqa: F401  (tests import it from here)


def tiny_config(style="gpt", **overrides):
    c = base_config()
    c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=8, mlp_dim=64, max_len=32)
    if style == "llama":
        c.model.update(num_kv_heads=8, position="rope", norm="rmsnorm", activation="swiglu",
                       use_bias=False, tie_embeddings=False)
    c.seq_len, c.batch_size, c.total_steps = 16, 16, 4
    c.optim.update(learning_rate=1e-2, warmup_steps=1)
    c.mesh.shape = (1, 1, 1)
    return apply_overrides(c, overrides)


def synthetic_batches(config, n, seed=0):
    """Packed-looking batches: two documents per row, random tokens."""
    rng = np.random.default_rng(seed)
    b, t = config.batch_size, config.seq_len
    out = []
    for _ in range(n):
        tokens = rng.integers(1, config.model.vocab_size, (b, t + 1))
        cut = rng.integers(2, t - 2, b)
        seg = np.where(np.arange(t)[None] < cut[:, None], 1, 2).astype(np.int32)
        seg[:, -1:] = 0  # a padded tail
        pos = np.where(seg == 1, np.arange(t)[None], np.arange(t)[None] - cut[:, None])
        pos = np.where(seg == 0, 0, pos).astype(np.int32)
        out.append({"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                    "segment_ids": seg, "positions": pos,
                    "weights": (seg != 0).astype(np.int32)})
    return out
