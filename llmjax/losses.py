"""Token cross-entropy as sums (so micro-batches add up to exactly the large batch's loss), whole
or a slice of positions at a time.

The chunked form never holds the [batch, length, vocab] float32 logits: it scans over slices of
`chunk` positions, each slice's logits made from the final hidden states by the model's `head`,
reduced to three sums and, in the same pass, to the loss's gradients.
At GPT-2 small's shape (vocab 50257, 8 x 1024 tokens) that is 1.6 GB of logits (and as much
again for their gradient) replaced by one slice's.
"""

from __future__ import annotations

import functools
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

    hidden: [batch, length, d_model]; targets, weights: [batch, length]; length % chunk == 0.
    The loss sum's gradients (to `hidden` and to every array `head` closes over, e.g. the output
    embedding) are made in the same pass, slice by slice, while each slice's logits are fresh in
    the cache (as Liger-Kernel's fused linear cross-entropy does on GPUs), and kept for the
    backward pass, which only scales them: no logits are made twice and no [batch, length, vocab]
    array is ever whole."""
    b, length = targets.shape
    if length % chunk:
        raise ValueError(f"loss_chunk={chunk} does not divide the sequence length {length}; set "
                         "--config.loss_chunk to a divisor of it (or 0 for the whole sequence).")
    # The head's parameters become explicit arguments, so the custom VJP can return their
    # gradients (a custom VJP must not close over values it differentiates).
    head, consts = jax.closure_convert(head, hidden[:, :chunk])
    return _fused_cross_entropy(head, chunk, hidden, targets, weights, *consts)


def _slices(x, chunk):  # [batch, length, ...] -> [n, batch, chunk, ...]
    b, length = x.shape[:2]
    return x.reshape(b, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_cross_entropy(head, chunk, hidden, targets, weights, *consts):
    return _fused_fwd(head, chunk, hidden, targets, weights, *consts)[0]


def _fused_fwd(head, chunk, hidden, targets, weights, *consts):
    def body(carry, xs):
        sums, dconsts = carry
        h, t, w = xs

        def loss(h, consts):
            loss_sum, count, correct = cross_entropy(head(h, *consts), t, w)
            return loss_sum, (count, correct)

        loss_sum, vjp, (count, correct) = jax.vjp(loss, h, consts, has_aux=True)
        dh, dc = vjp(jnp.ones_like(loss_sum))
        sums = jax.tree.map(jnp.add, sums, (loss_sum, count, correct))
        return (sums, jax.tree.map(jnp.add, dconsts, dc)), dh

    zero = jnp.zeros((), jnp.float32)
    dconsts = jax.tree.map(jnp.zeros_like, consts)
    (sums, dconsts), dh = jax.lax.scan(
        body, ((zero, zero, zero), dconsts),
        (_slices(hidden, chunk), _slices(targets, chunk), _slices(weights, chunk)))
    dhidden = dh.swapaxes(0, 1).reshape(hidden.shape)
    return sums, (dhidden, dconsts, targets, weights)


def _fused_bwd(head, chunk, res, cotangents):
    dhidden, dconsts, targets, weights = res
    g = cotangents[0]  # the loss sum's; the count and the correct count are not differentiable
    return (dhidden * g.astype(dhidden.dtype), None, None,
            *(d * g.astype(d.dtype) for d in dconsts))


_fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)
