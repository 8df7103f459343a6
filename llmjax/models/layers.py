"""Building blocks shared by every model family.

Parameters are float32 (or `param_dtype`) and carry logical axis names; each block casts them to
the compute `dtype` when it uses them. Softmax runs in float32 whatever the compute dtype.
Randomness (dropout) comes in as an explicit key, so a step is a pure function of (state, batch,
key) and resumes bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.sharding import constrain

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str],
          dtype=jnp.float32) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ W (+ b), where W maps the trailing `in_shape` dims of x to `out_shape`.

    Multi-dimensional in/out shapes (e.g. embed -> heads x head_dim) keep the head axis visible to
    the sharding rules instead of hiding it inside a flattened matrix.
    """

    def __init__(self, in_shape, out_shape, names, *, use_bias: bool, rngs: nnx.Rngs,
                 init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in, self.dtype = len(in_shape), dtype
        self.kernel = param(rngs, nnx.initializers.normal(init_std), in_shape + out_shape, names,
                            param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, out_shape, names[len(in_shape):],
                           param_dtype) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        axes = tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (axes, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, num: int, features: int, names, *, rngs: nnx.Rngs, init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype, self.names = dtype, tuple(names)
        self.embedding = param(rngs, nnx.initializers.normal(init_std), (num, features), names,
                               param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather the FSDP shards of the table first: gathering rows from a table split along its
        # feature axis gives activations split the same way, which XLA can only turn into
        # batch-split activations by replicating everything ("involuntary rematerialisation").
        table = constrain(self.embedding[...], (self.names[0], None))
        out = jnp.take(table, ids, axis=0).astype(self.dtype)
        return constrain(out, ("act_batch", "act_length", "act_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (a tied output head), accumulated in float32."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, use_bias: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (features,), ("norm",), param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (features,), ("norm",), param_dtype)
                     if use_bias else None)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (features,), ("norm",), param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(self.dtype)


def make_norm(kind: str, features: int, *, eps: float, use_bias: bool, rngs, dtype, param_dtype):
    if kind == "layernorm":
        return LayerNorm(features, eps=eps, use_bias=use_bias, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
    if kind == "rmsnorm":
        return RMSNorm(features, eps=eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"model.norm={kind!r} is not one of 'layernorm', 'rmsnorm'.")


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split layout (the Hugging Face LLaMA convention).

    x: [batch, length, heads, head_dim]; positions: [batch, length]. Computed in float32.
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, t, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, *, causal: bool) -> jax.Array:
    """Boolean [batch, 1, 1, q_len, kv_len]: a query sees keys of its own segment (and, if causal,
    not after itself). Segment 0 is padding: no real token attends to it."""
    q_len, kv_len = q_segments.shape[1], kv_segments.shape[1]
    mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
    if causal:
        mask &= jnp.tril(jnp.ones((q_len, kv_len), bool), kv_len - q_len)
    if q_len == kv_len:
        # A padding query would see no key at all; fused kernels turn such all-masked rows into
        # NaN gradients. Letting it see itself changes no real position's output.
        mask |= jnp.eye(q_len, dtype=bool) & (q_segments[:, :, None] == 0)
    return mask[:, None, None]


def dot_product_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_key=None):
    """Grouped-query attention. q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; mask broadcastable
    to [b, kv_heads, groups, t, s]. Logits and softmax in float32."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d) * (1.0 / math.sqrt(d))
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    # A finite fill keeps fully masked (padding) rows finite; their outputs are never scored.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_key).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


# A KV cache is sharded like the activations it stores: batch over data/fsdp, kv heads over tensor.
CACHE_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")


class Attention(nnx.Module):
    """Multi-head self-attention with grouped-query support and optional RoPE."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, out_std: float, dtype, param_dtype):
        d, n, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  init_std=cfg.init_std)
        self.query = Linear((d,), (n, hd), ("embed", "heads", "head_dim"), **kw)
        self.key = Linear((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.value = Linear((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        kw["init_std"] = out_std
        self.out = Linear((n, hd), (d,), ("heads", "head_dim", "embed"), **kw)
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.dropout_rate = cfg.dropout_rate
        self.implementation = cfg.attention

    def __call__(self, x, mask, positions, dropout_key=None, cache=None):
        """`cache`: None, or (k, v, index) for incremental decoding, where k and v are this layer's
        [batch, cache_len, kv_heads, head_dim] keys and values so far and `index` the column where
        this call's tokens go. The new keys and values are written there, the queries attend over
        the whole cache (`mask` is then [b, 1, 1, t, cache_len]), and the call returns
        (out, (k, v)) instead of out."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope_theta is not None:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        if cache is not None:
            k_cache, v_cache, index = cache
            # Keys are cached after RoPE: a cached key never moves, so it is rotated once.
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            k = constrain(k, CACHE_AXES)
            v = constrain(v, CACHE_AXES)
            # The portable path whatever `implementation`: a decode step is one query per row,
            # where a fused kernel saves little (a long prefill would gain from one; not done).
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
            return self.out(out), (k, v)
        if self.implementation == "cudnn":
            # cuDNN's fused (flash) kernel on NVIDIA GPUs: the [t, s] logits never reach memory.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, :, 0], implementation="cudnn")
        else:
            out = dot_product_attention(q, k, v, mask, dropout_rate=self.dropout_rate,
                                        dropout_key=dropout_key)
        return self.out(out)


class Mlp(nnx.Module):
    """GELU MLP (GPT-2) or gated SwiGLU (LLaMA): wo(act(wi x) [* wi_gate x])."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, out_std: float, dtype, param_dtype):
        d, f = cfg.d_model, cfg.mlp_dim
        kw = dict(use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  init_std=cfg.init_std)
        self.activation = cfg.activation
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"model.activation={cfg.activation!r} is not one of 'gelu', 'swiglu'.")
        self.wi = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.wi_gate = Linear((d,), (f,), ("embed", "mlp"), **kw) if cfg.activation == "swiglu" else None
        kw["init_std"] = out_std
        self.wo = Linear((f,), (d,), ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = self.wi(x)
        if self.wi_gate is None:
            h = jax.nn.gelu(h, approximate=True)
        else:
            h = jax.nn.silu(self.wi_gate(x)) * h
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return self.wo(h)
