"""Building blocks shared by every model family.

Parameters are float32 (or `param_dtype`) and carry logical axis names; each block casts them to
the compute `dtype` when it uses them. Softmax runs in float32 whatever the compute dtype.
Randomness (dropout) comes in as an explicit key, so a step is a pure function of (state, batch,
key) and resumes bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_dense(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x @ kernel over x's trailing `n_in` dims, for a bfloat16/float16 `x` and a float32 (or
    low-precision) `kernel`: all three matmuls (forward, input and kernel gradients) take
    low-precision operands and accumulate in float32. Plain autodiff would give the backward pass
    a float32 cotangent and so float32 matmuls; on CPUs with bf16 dot instructions (AVX512-BF16,
    AMX) the bf16 -> f32 kernel runs twice as fast as float32. The kernel's gradient comes out in
    the kernel's own dtype, from the float32 accumulator (not rounded through bfloat16)."""
    return _low_precision_dense_fwd(x, kernel, n_in)[0]


def _contract(a, b, a_axes, b_axes):
    return jax.lax.dot_general(a, b, ((tuple(a_axes), tuple(b_axes)), ((), ())),
                               preferred_element_type=jnp.float32)


def _low_precision_dense_fwd(x, kernel, n_in):
    k = kernel.astype(x.dtype)
    y = _contract(x, k, range(x.ndim - n_in, x.ndim), range(n_in)).astype(x.dtype)
    return y, (x, kernel)  # the kernel is live anyway (a parameter); its cast is recomputed


def _low_precision_dense_bwd(n_in, res, g):
    x, kernel = res
    k, kernel_dtype, g = kernel.astype(x.dtype), kernel.dtype, g.astype(x.dtype)
    n_out, n_batch = k.ndim - n_in, x.ndim - n_in
    dx = _contract(g, k, range(g.ndim - n_out, g.ndim), range(n_in, k.ndim)).astype(x.dtype)
    dk = _contract(x, g, range(n_batch), range(n_batch)).astype(kernel_dtype)
    return dx, dk


low_precision_dense.defvjp(_low_precision_dense_fwd, _low_precision_dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def low_precision_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 `jnp.einsum(spec, a, b)` of low-precision operands whose gradients are again
    low-precision x low-precision einsums with float32 accumulation (the attention contractions
    of a bfloat16 model). Plain autodiff would contract the float32 cotangent with a bfloat16
    operand: a mixed-type matmul that XLA's CPU backend leaves to a generic loop instead of its
    bf16 kernels. Every index of an operand must appear in the other operand or the output."""
    return _low_precision_einsum_fwd(spec, a, b)[0]


def _low_precision_einsum_fwd(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), (a, b)


def _low_precision_einsum_bwd(spec, res, g):
    a, b = res
    inputs, out = spec.replace(" ", "").split("->")
    a_spec, b_spec = inputs.split(",")
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{out},{b_spec}->{a_spec}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{out},{a_spec}->{b_spec}", g, a, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y + bias (over y's trailing dims) for a low-precision y, whose bias gradient is summed in
    float32: XLA's CPU backend rewrites a long bfloat16 reduction into a windowed one (for
    accuracy) that ran 9 ms per MLP bias per step of the tiny GPT-2 workload."""
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
    axes = tuple(range(g.ndim - bias.ndim))
    return g, jnp.sum(g.astype(jnp.float32), axis=axes).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def low_precision_attend(x: jax.Array, table: jax.Array) -> jax.Array:
    """float32 logits x @ table.T (a tied output head, table [vocab, d]) as low_precision_dense:
    low-precision operands in all three matmuls, float32 accumulation. Kept in the table's own
    layout: XLA's CPU backend has no bf16 x bf16 -> f32 kernel for the transposed table gradient
    that autodiff of `table.T` produces."""
    return _low_precision_attend_fwd(x, table)[0]


def _low_precision_attend_fwd(x, table):
    logits = _contract(x, table.astype(x.dtype), (x.ndim - 1,), (1,))
    return logits, (x, table)


def _low_precision_attend_bwd(res, g):
    x, table = res
    g = g.astype(x.dtype)
    dx = _contract(g, table.astype(x.dtype), (g.ndim - 1,), (0,)).astype(x.dtype)
    dtable = _contract(g, x, range(x.ndim - 1), range(x.ndim - 1)).astype(table.dtype)
    return dx, dtable


low_precision_attend.defvjp(_low_precision_attend_fwd, _low_precision_attend_bwd)


class Linear(nnx.Module):
    """y = x @ W (+ b), where W maps the trailing `in_shape` dims of x to `out_shape`.

    Multi-dimensional in/out shapes (e.g. embed -> heads x head_dim) keep the head axis visible to
    the sharding rules instead of hiding it inside a flattened matrix. Matmuls accumulate in
    float32 whatever the compute dtype (low_precision_dense for bfloat16/float16).
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
        x = x.astype(self.dtype)
        if self.dtype == jnp.float32:
            axes = tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))
            y = jax.lax.dot_general(x, self.kernel[...].astype(jnp.float32), (axes, ((), ())))
        else:
            y = low_precision_dense(x, self.kernel[...], self.n_in)
        if self.bias is not None:
            y = (y + self.bias[...].astype(self.dtype) if self.dtype == jnp.float32
                 else add_bias(y, self.bias[...]))
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
        if self.dtype == jnp.float32:
            return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(jnp.float32))
        # The largest matmul of a small model (vocab x d_model per token): low-precision operands
        # forward and backward, float32 logits.
        return low_precision_attend(x.astype(self.dtype), self.embedding[...])


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


def dot_product_attention(q, k, v, mask, bias=None, *, scale=True, dropout_rate=0.0,
                          dropout_key=None):
    """Multi-head and grouped-query attention. q: [b, t, heads, d]; k, v: [b, s, kv_heads, d];
    mask (boolean) and bias (additive, e.g. T5's relative positions) broadcastable to
    [b, kv_heads, groups, t, s]. Logits and softmax in float32. T5 does not scale the queries (its
    init absorbs head_dim**-0.5): `scale=False`."""
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    if scale:
        q = q * (1.0 / math.sqrt(d))
    # Heads-major, with each kv head's query groups merged into its query rows: every contraction
    # is then one batched [rows, d] x [d, s] matmul over (b, kv). XLA's CPU matmuls ran the 5-D
    # [b, kv, g, t, s] form (two free dimensions a side) 2.2x slower, forward and backward.
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # bfloat16 operands: float32 accumulation in the backward matmuls too (low_precision_einsum).
    einsum = (functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
              if q.dtype == jnp.float32 else low_precision_einsum)
    logits = einsum("bkqd,bksd->bkqs", q, k)
    # Masked keys get a large negative bias: exp() makes them exactly 0, and a fully masked
    # (padding) row stays finite (its outputs are never scored). Added, not selected: a select
    # against a constant makes autodiff keep a logits-sized constant per layer for the backward
    # pass (18% of the tiny GPT-2 step on the CPU), while an add needs nothing kept.
    logits = logits + _rows_major(jnp.where(mask, 0.0, -1e30).astype(jnp.float32), g, t, s)
    if bias is not None:
        logits = logits + _rows_major(bias.astype(jnp.float32), g, t, s)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_key).astype(v.dtype)
    out = einsum("bkqs,bksd->bkqd", probs, v)
    out = out.astype(v.dtype).reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, d)


def causal_attention(q, k, v, mask, block: int, *, dropout_rate=0.0, dropout_key=None):
    """`dot_product_attention(q, k, v, mask)` for a causal `mask` (no query sees a later key;
    q, k, v of the same length), `block` query rows at a time: rows [i, i + block) read keys
    [0, i + block) only. The masked upper triangle is skipped instead of computed and discarded,
    and each block's logits are small enough to stay in cache: at GPT-2 small's 1024 positions,
    blocks of 128 made the attention's forward and backward 1.6x faster on 2 CPU cores."""
    t = q.shape[1]
    if not block or t <= block:
        return dot_product_attention(q, k, v, mask, dropout_rate=dropout_rate,
                                     dropout_key=dropout_key)
    out = []
    for i, start in enumerate(range(0, t, block)):
        end = min(start + block, t)
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        out.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                         mask[..., start:end, :end], dropout_rate=dropout_rate,
                                         dropout_key=key))
    return jnp.concatenate(out, axis=1)


def _rows_major(x: jax.Array, g: int, t: int, s: int) -> jax.Array:
    """A mask or bias broadcastable to [b, kv_heads, groups, t, s] as [b|1, kv_heads|1, groups * t,
    s], the query rows of `dot_product_attention`'s logits (broadcast over the groups if needed)."""
    x = x.reshape((1,) * (5 - x.ndim) + x.shape)
    x = jnp.broadcast_to(x, x.shape[:2] + (g, t, s))
    return x.reshape(x.shape[0], x.shape[1], g * t, s)


def init_std(cfg, fan_in: int, default: float) -> float:
    """The initial std of a weight read by `fan_in` inputs: `default` under cfg.init='normal', and
    fan_in**-0.5 under cfg.init='t5' (T5X's variance_scaling(1, 'fan_in')): every projection of a
    unit-scale input is then unit-scale at any width, next to N(0, 1) token embeddings. With 0.02
    everywhere T5's pre-norm stack starts with embeddings 10x smaller than the position-mixed
    attention output, and its encoder output hardly depends on the input."""
    return fan_in ** -0.5 if cfg.init == "t5" else default


# A KV cache is sharded like the activations it stores: batch over data/fsdp, kv heads over tensor.
CACHE_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")


class Attention(nnx.Module):
    """Multi-head self-attention with grouped-query support and optional RoPE."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, out_std: float, dtype, param_dtype):
        d, n, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  init_std=init_std(cfg, d, cfg.init_std))
        # Without query scaling (T5), its init carries head_dim**-0.5 instead (T5X).
        q_std = kw["init_std"] * (hd ** -0.5 if cfg.init == "t5" and not cfg.scale_attention else 1)
        self.query = Linear((d,), (n, hd), ("embed", "heads", "head_dim"), **dict(kw, init_std=q_std))
        self.key = Linear((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.value = Linear((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        kw["init_std"] = init_std(cfg, n * hd, out_std)
        self.out = Linear((n, hd), (d,), ("heads", "head_dim", "embed"), **kw)
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.dropout_rate = cfg.dropout_rate
        self.implementation = cfg.attention
        self.causal_block = cfg.causal_block

    def __call__(self, x, mask, positions, dropout_key=None, cache=None, causal=False):
        """`cache`: None, or (k, v, index) for incremental decoding, where k and v are this layer's
        [batch, cache_len, kv_heads, head_dim] keys and values so far and `index` the column where
        this call's tokens go. The new keys and values are written there, the queries attend over
        the whole cache (`mask` is then [b, 1, 1, t, cache_len]), and the call returns
        (out, (k, v)) instead of out. Without a cache and under implementation 'splash', `mask` is
        the [b, t] segment ids instead (the kernel applies them and the causal mask itself).
        `causal`: `mask` lets no query see a later key (the portable path then skips the masked
        blocks, `causal_attention`)."""
        # Named for the remat policies that save them (decoder.REMAT_POLICIES, MaxText's names).
        q = checkpoint_name(self.query(x), "query_proj")
        k = checkpoint_name(self.key(x), "key_proj")
        v = checkpoint_name(self.value(x), "value_proj")
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
        if self.implementation == "splash":
            # The Pallas TPU kernel (models/splash.py); here `mask` is the [b, t] segment ids.
            from llmjax.models.splash import splash_attention
            out = splash_attention(q, k, v, mask)
        elif self.implementation == "cudnn":
            # cuDNN's fused (flash) kernel on NVIDIA GPUs: the [t, s] logits never reach memory.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, :, 0], implementation="cudnn")
        elif causal:  # 'xla', or an 'auto' that nothing resolved (models/__init__.py)
            out = causal_attention(q, k, v, mask, self.causal_block,
                                   dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        else:
            out = dot_product_attention(q, k, v, mask, dropout_rate=self.dropout_rate,
                                        dropout_key=dropout_key)
        return checkpoint_name(self.out(checkpoint_name(out, "context")), "out_proj")


# name -> (nonlinearity, gated). Gated MLPs apply it to the gate: wo(act(wi_gate x) * wi x).
MLP_ACTIVATIONS = {
    "gelu": (functools.partial(jax.nn.gelu, approximate=True), False),  # GPT-2's tanh form
    "gelu_exact": (functools.partial(jax.nn.gelu, approximate=False), False),  # BERT, BART (erf)
    "relu": (jax.nn.relu, False),  # T5 v1.0
    "swiglu": (jax.nn.silu, True),  # LLaMA
    "gated_gelu": (functools.partial(jax.nn.gelu, approximate=True), True),  # T5 v1.1 (gelu_new)
}


class Mlp(nnx.Module):
    """Plain MLP wo(act(wi x)) (GPT-2, BERT, T5 v1.0) or gated wo(act(wi_gate x) * wi x) (LLaMA's
    SwiGLU, T5 v1.1's gated GELU)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, out_std: float, dtype, param_dtype):
        d, f = cfg.d_model, cfg.mlp_dim
        kw = dict(use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  init_std=init_std(cfg, d, cfg.init_std))
        self.activation = cfg.activation
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(f"model.activation={cfg.activation!r} is not one of "
                             f"{sorted(MLP_ACTIVATIONS)}.")
        gated = MLP_ACTIVATIONS[self.activation][1]
        self.wi = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.wi_gate = Linear((d,), (f,), ("embed", "mlp"), **kw) if gated else None
        kw["init_std"] = init_std(cfg, f, out_std)
        self.wo = Linear((f,), (d,), ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = checkpoint_name(self.wi(x), "mlpwi")
        act = MLP_ACTIVATIONS[self.activation][0]
        if self.wi_gate is None:
            h = act(h)
        else:
            h = act(checkpoint_name(self.wi_gate(x), "mlpwi_gate")) * h
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return checkpoint_name(self.wo(h), "mlpwo")


# ---------------------------------------------------------------------------------------------
# Encoder and encoder-decoder blocks (BERT, RoBERTa, T5, BART). The decoder family above keeps
# its own Attention; these add what the other families need: cross-attention, an additive
# position bias, unscaled queries (T5), post-LN and a relative position bias shared per stack.


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of `memory_position - query_position`: half the buckets are exact offsets,
    the rest grow logarithmically up to `max_distance` (farther offsets share the last bucket).
    Bidirectional stacks spend half the buckets on keys after the query."""
    rel = relative_position
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(rel.dtype) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # The log of 0 is never used (is_small covers it); the maximum keeps it finite for jnp.where.
    log_ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, rel, large)


class RelativePositionBias(nnx.Module):
    """T5's learned scalar bias per (bucket, head), computed once per stack and added to every
    layer's self-attention logits (Hugging Face keeps it in the stack's first layer)."""

    def __init__(self, cfg, *, bidirectional: bool, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        # "position" (replicated): a few hundred numbers, read by every attention head's shard.
        # t5: T5X's variance_scaling(1, 'fan_avg') over the [buckets, heads] table.
        std = init_std(cfg, (self.num_buckets + cfg.num_heads) // 2, cfg.init_std)
        self.embedding = param(rngs, nnx.initializers.normal(std),
                               (self.num_buckets, cfg.num_heads), ("position", "heads"), param_dtype)

    def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
        """[batch, heads, q_len, kv_len] float32 bias from per-token positions [batch, len]."""
        rel = kv_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)
        bias = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)  # [b, t, s, h]
        return bias.transpose(0, 3, 1, 2)


class MultiHeadAttention(Attention):
    """Self-attention (`context` None) or cross-attention (keys and values from `context`) with an
    optional additive bias; `Attention`'s parameters (query, key, value, out), where the encoder
    families validate num_kv_heads == num_heads."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, out_std: float, dtype, param_dtype):
        super().__init__(cfg, rngs=rngs, out_std=out_std, dtype=dtype, param_dtype=param_dtype)
        self.scale = cfg.scale_attention

    def project_kv(self, context):
        """Cross-attention keys and values of `context` [b, s, d] (computed once when decoding)."""
        names = ("act_batch", "act_length", "act_heads", "act_head_dim")
        return constrain(self.key(context), names), constrain(self.value(context), names)

    def __call__(self, x, mask, bias=None, context=None, dropout_key=None, cache=None):
        """`cache` (incremental decoding; the call then returns (out, cache)): for self-attention
        (k, v, index) as in `Attention`, the new keys and values written at column `index` and the
        queries attending over the whole cache; for cross-attention (k, v) from `project_kv`,
        used as they are (`context` is then not needed)."""
        names = ("act_batch", "act_length", "act_heads", "act_head_dim")
        if cache is not None:
            q = constrain(self.query(x), names)
            if len(cache) == 3:
                k_cache, v_cache, index = cache
                k = jax.lax.dynamic_update_slice(k_cache, self.key(x).astype(k_cache.dtype),
                                                 (0, index, 0, 0))
                v = jax.lax.dynamic_update_slice(v_cache, self.value(x).astype(v_cache.dtype),
                                                 (0, index, 0, 0))
                cache = (constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))
            k, v = cache
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask[:, :, None],
                                        None if bias is None else bias[:, :, None], scale=self.scale)
            return self.out(out), cache
        kv = x if context is None else context
        q = constrain(self.query(x), names)
        k, v = constrain(self.key(kv), names), constrain(self.value(kv), names)
        # mask [b, 1, t, s] and bias [b, heads, t, s] gain the group axis (one query per kv head).
        out = dot_product_attention(q, k, v, mask[:, :, None],
                                    None if bias is None else bias[:, :, None], scale=self.scale,
                                    dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        return self.out(out)


class TransformerBlock(nnx.Module):
    """Self-attention, optional cross-attention, MLP; each a residual sub-layer that is pre-norm
    `x + f(norm(x))` (T5) or post-norm `norm(x + f(x))` (BERT, BART: `cfg.post_norm`)."""

    def __init__(self, cfg, *, cross: bool, num_layers: int, rngs: nnx.Rngs):
        from llmjax.models.decoder import dtype_of
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # Pre-norm stacks scale the residual writers' init by 1/sqrt(2 * layers) (GPT-2); post-norm
        # stacks renormalise after every sub-layer and use one std (BERT).
        out_std = cfg.init_std if cfg.post_norm else cfg.init_std / math.sqrt(2 * num_layers)
        kw = dict(rngs=rngs, out_std=out_std, dtype=dtype, param_dtype=pdtype)
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, **norm)
        self.attn = MultiHeadAttention(cfg, **kw)
        if cross:
            self.cross_norm = make_norm(cfg.norm, cfg.d_model, **norm)
            self.cross_attn = MultiHeadAttention(cfg, **kw)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, **norm)
        self.mlp = Mlp(cfg, **kw)
        self.post_norm, self.dropout_rate = cfg.post_norm, cfg.dropout_rate

    def _residual(self, x, norm, f, key):
        if self.post_norm:
            return norm(x + dropout(f(x), self.dropout_rate, key))
        return x + dropout(f(norm(x)), self.dropout_rate, key)

    def __call__(self, x, mask, bias=None, context=None, cross_mask=None, key=None, cache=None):
        """`cache` (decoding, no dropout): (k, v, index, cross_k, cross_v) for this layer, see
        `MultiHeadAttention`; returns (x, (k, v)) with the updated self-attention cache."""
        if cache is not None:
            return self._decode_step(x, mask, bias, cross_mask, cache)
        keys = jax.random.split(key, 5) if key is not None else (None,) * 5
        x = self._residual(x, self.attn_norm,
                           lambda h: self.attn(h, mask, bias, dropout_key=keys[0]), keys[1])
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm,
                               lambda h: self.cross_attn(h, cross_mask, context=context,
                                                         dropout_key=keys[2]), keys[3])
        x = self._residual(x, self.mlp_norm, self.mlp, keys[4])
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def _decode_step(self, x, mask, bias, cross_mask, cache):
        k, v, index, cross_k, cross_v = cache
        kv = {}  # `_residual` takes a function of one array: the updated cache comes out here

        def attn(h):
            out, kv["self"] = self.attn(h, mask, bias, cache=(k, v, index))
            return out

        x = self._residual(x, self.attn_norm, attn, None)
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm,
                               lambda h: self.cross_attn(h, cross_mask,
                                                         cache=(cross_k, cross_v))[0], None)
        x = self._residual(x, self.mlp_norm, self.mlp, None)
        return constrain(x, ("act_batch", "act_length", "act_embed")), kv["self"]


class Stack(nnx.Module):
    """One transformer stack (BERT's encoder; T5's or BART's encoder or decoder) with what belongs
    to it: learned positions or the relative bias, token types, the embedding norm of post-LN
    models, the scanned blocks and the final norm of pre-norm models. The token table lives in the
    model, which may share it between stacks.

    `causal` makes self-attention causal (decoders); `cross` adds cross-attention to `context`;
    `own_positions=False` leaves positions to the caller (the ViT's fixed 2-D sin-cos table).
    """

    def __init__(self, cfg, *, num_layers: int, causal: bool, cross: bool, rngs: nnx.Rngs,
                 own_positions: bool = True):
        from llmjax.models.decoder import dtype_of
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.cfg, self.num_layers, self.causal = cfg, num_layers, causal
        emb = dict(rngs=rngs, init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)
        self.pos_embed = (Embed(cfg.max_len + cfg.position_offset, cfg.d_model, ("position", "embed"),
                                **emb) if cfg.position == "learned" and own_positions else None)
        self.relpos_bias = (RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs,
                                                 param_dtype=pdtype)
                            if cfg.position == "relative" else None)
        self.type_embed = (Embed(cfg.type_vocab_size, cfg.d_model, ("position", "embed"), **emb)
                           if cfg.type_vocab_size else None)
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.embed_norm = LayerNorm(cfg.d_model, **norm) if cfg.post_norm else None

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return TransformerBlock(cfg, cross=cross, num_layers=num_layers, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = None if cfg.post_norm else make_norm(cfg.norm, cfg.d_model, **norm)

    def __call__(self, x, segment_ids, positions, *, token_types=None, context=None,
                 context_segments=None, dropout_key=None, cache=None):
        """x: token embeddings [b, t, d]; returns the stack's output [b, t, d]. With a `cache`
        (decoding, see `_decode`) returns (output, updated cache)."""
        from llmjax.models.decoder import REMAT_POLICIES
        cfg = self.cfg
        keys = (jax.random.split(dropout_key, self.num_layers + 1) if dropout_key is not None
                else None)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + cfg.position_offset)
        if self.type_embed is not None:
            x = x + self.type_embed(jnp.zeros_like(segment_ids) if token_types is None else token_types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = dropout(x, cfg.dropout_rate, None if keys is None else keys[-1])
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        if cache is not None:
            return self._decode(x, segment_ids, positions, context_segments, cache)
        mask = attention_mask(segment_ids, segment_ids, causal=self.causal)[:, 0]  # [b, 1, t, t]
        bias = None if self.relpos_bias is None else self.relpos_bias(positions, positions)
        cross_mask = (None if context is None else
                      attention_mask(segment_ids, context_segments, causal=False)[:, 0])

        graphdef, stacked = nnx.split(self.layers)

        def block(x, layer):
            state, key = layer
            return nnx.merge(graphdef, state)(x, mask, bias, context, cross_mask, key), None

        if cfg.remat_policy != "none":
            block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        x, _ = jax.lax.scan(block, x, (stacked, None if keys is None else keys[:-1]))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def cross_kv(self, context):
        """Every layer's cross-attention keys and values of `context`, stacked over the layers:
        two [layers, b, s, heads, head_dim] arrays (a decoder computes them once per input)."""
        graphdef, stacked = nnx.split(self.layers)

        def block(_, state):
            k, v = nnx.merge(graphdef, state).cross_attn.project_kv(context)
            return None, (constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))

        _, (k, v) = jax.lax.scan(block, None, stacked)
        return constrain(k, STACKED_CACHE_AXES), constrain(v, STACKED_CACHE_AXES)

    def init_cache(self, context, length: int) -> dict:
        """An empty self-attention cache of `length` columns for a causal stack, with the
        cross-attention keys and values of `context` [b, s, d] (computed here, once).

        k, v: [layers, b, length, heads, head_dim] (compute dtype); cross_k, cross_v:
        [layers, b, s, heads, head_dim]; index: the next column to write; valid: [b, length], True
        where a real token was written; positions: [b, length], each column's position (T5's
        relative bias of a new query against the cached keys)."""
        cfg, batch = self.cfg, context.shape[0]
        shape = (self.num_layers, batch, length, cfg.num_heads, cfg.head_dim)
        zeros = constrain(jnp.zeros(shape, context.dtype), STACKED_CACHE_AXES)
        cross_k, cross_v = self.cross_kv(context)
        return {"k": zeros, "v": zeros, "cross_k": cross_k, "cross_v": cross_v,
                "index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool),
                "positions": jnp.zeros((batch, length), jnp.int32)}

    def _decode(self, x, segment_ids, positions, context_segments, cache):
        """The causal blocks over a cache: this call's tokens go to columns index..index+t-1 and
        attend to every valid column up to their own; the cross-attention keys and values come
        from the cache. Each layer's cache slice is a scan input, its updated slice an output."""
        index, t = cache["index"], x.shape[1]
        valid = jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0, (0, index))
        cached_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
        columns = jnp.arange(valid.shape[1])
        causal = columns[None, :] <= (index + jnp.arange(t))[:, None]  # [t, cache_len]
        mask = (valid[:, None, :] & causal[None])[:, None]  # [b, 1, t, cache_len]
        # The relative bias of the new queries against every cached key: the full forward's rows.
        bias = (None if self.relpos_bias is None
                else self.relpos_bias(positions, cached_positions))
        cross_mask = attention_mask(segment_ids, context_segments, causal=False)[:, 0]
        graphdef, stacked = nnx.split(self.layers)

        def block(x, layer):
            state, k, v, cross_k, cross_v = layer
            return nnx.merge(graphdef, state)(x, mask, bias, cross_mask=cross_mask,
                                              cache=(k, v, index, cross_k, cross_v))

        x, (k, v) = jax.lax.scan(block, x, (stacked, cache["k"], cache["v"], cache["cross_k"],
                                            cache["cross_v"]))
        if self.final_norm is not None:
            x = self.final_norm(x)
        new = dict(cache, k=constrain(k, STACKED_CACHE_AXES), v=constrain(v, STACKED_CACHE_AXES),
                   index=index + t, valid=valid, positions=cached_positions)
        return x, new


STACKED_CACHE_AXES = (None,) + CACHE_AXES  # [layers, batch, length, heads, head_dim]
