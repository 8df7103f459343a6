"""Token cross-entropy as sums (so micro-batches add up to exactly the large batch's loss), whole
or a slice of positions at a time.

The chunked form never holds the [batch, length, vocab] float32 logits: it scans over slices of
`chunk` positions, each slice's logits made from the final hidden states by the model's `head`,
reduced to three sums, and made again in the backward pass (`jax.checkpoint`) instead of stored.
At GPT-2 small's shape (vocab 50257, 8 x 1024 tokens) that is 1.6 GB of logits (and as much
again for their gradient) replaced by one slice's.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """(weighted loss sum, weight sum, weighted correct sum) over float32 logits [..., vocab].

    One pass over the logits serves both the loss and the accuracy: a prediction is correct when
    the target's logit is the row's maximum (a tie for the maximum counts as correct), which the
    log-sum-exp needs anyway. An argmax (a value-and-index reduction) took 15% of the tiny GPT-2
    step on the CPU."""
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    lse = jnp.log(jnp.exp(logits - top).sum(-1)) + top[..., 0]
    target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = (target_logit >= top[..., 0]).astype(jnp.float32)
    return ((lse - target_logit) * weights).sum(), weights.sum(), (correct * weights).sum()


def chunked_cross_entropy(head: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, weights: jax.Array, chunk: int):
    """`cross_entropy(head(hidden), targets, weights)` a slice of `chunk` positions at a time.

    hidden: [batch, length, d_model]; targets, weights: [batch, length]; length % chunk == 0."""
    b, length = targets.shape
    if length % chunk:
        raise ValueError(f"loss_chunk={chunk} does not divide the sequence length {length}; set "
                         "--config.loss_chunk to a divisor of it (or 0 for the whole sequence).")
    n = length // chunk

    def slices(x):  # [batch, length, ...] -> [n, batch, chunk, ...]
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, t, w):
        return cross_entropy(head(h), t, w)

    def body(sums, xs):
        return jax.tree.map(jnp.add, sums, one(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero),
                           (slices(hidden), slices(targets), slices(weights)))
    return sums
