"""Plain autoregressive sampling, one full forward pass per new token (no KV cache).

Enough to show what a model learned at the end of a run; it recomputes the whole window for each
token, so it is O(length^2) and meant for short samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(graphdef, params, prompt_ids: list[int], *, max_new_tokens: int, window: int,
           temperature: float = 0.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None):
    """Extends `prompt_ids` by up to `max_new_tokens` tokens; greedy when temperature is 0."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token of text to continue.")
    ids = list(prompt_ids)[-window:]

    @jax.jit
    def next_token(params, tokens, length, key):
        logits = nnx.merge(graphdef, params)(tokens)[0, length - 1]
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        greedy = logits.argmax()
        drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, drawn, greedy)

    key = jax.random.key(seed)
    out = []
    for i in range(max_new_tokens):
        context = ids[-window:]
        tokens = np.zeros((1, window), np.int32)  # fixed shape: one compilation for every length
        tokens[0, :len(context)] = context
        token = int(next_token(params, tokens, len(context), jax.random.fold_in(key, i)))
        if eos_id is not None and token == eos_id:
            break
        ids.append(token)
        out.append(token)
    return out
