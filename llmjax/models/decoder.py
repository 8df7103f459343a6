"""Decoder-only transformer: GPT-2/GPT-3 style and LLaMA style from one module.

Call convention (shared by every family):
    logits = model(tokens, segment_ids=None, positions=None, dropout_key=None)
tokens, segment_ids, positions: int [batch, length]. Segment ids mark packed documents (0 is
padding, which nothing attends to); positions restart at 0 in each document. Returns float32
logits [batch, length, vocab]. Dropout is on only when a `dropout_key` is given.

The `model` config section chooses the style:
    GPT-2:  position='learned', norm='layernorm', activation='gelu', use_bias=True, tie_embeddings=True
    LLaMA:  position='rope', norm='rmsnorm', activation='swiglu', use_bias=False, tie_embeddings=False,
            num_kv_heads < num_heads for grouped-query attention.
Layers are stacked along a leading `layers` axis and applied with `jax.lax.scan`, so compile time
does not grow with depth; `remat_policy` wraps the scanned block in `jax.checkpoint`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models import layers as L
from llmjax.sharding import constrain

_save = jax.checkpoint_policies.save_only_these_names
_QKV = ("query_proj", "key_proj", "value_proj")
_MLP_IN = ("mlpwi", "mlpwi_gate")
# What the backward pass keeps of each layer's forward (the rest is recomputed). The named ones
# save the projections layers.py tags with `checkpoint_name` (MaxText's policy names): from most
# memory to least, none > minimal > save_dot_except_mlpwi > save_dot_except_mlp > save_qkv_proj
# > save_out_proj > full.
REMAT_POLICIES = {
    "none": None,  # keep everything
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": _save(*_QKV, "out_proj", *_MLP_IN, "mlpwo"),  # every weight matmul's output
    "save_dot_except_mlpwi": _save(*_QKV, "context", "out_proj", "mlpwo"),
    "save_dot_except_mlp": _save(*_QKV, "context", "out_proj"),
    "save_qkv_proj": _save(*_QKV),
    "save_out_proj": _save("out_proj"),
}


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * layers), so the stream's variance does not grow with depth.
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.attn_norm = L.make_norm(cfg.norm, cfg.d_model, **norm)
        self.attn = L.Attention(cfg, rngs=rngs, out_std=out_std, dtype=dtype, param_dtype=pdtype)
        self.mlp_norm = L.make_norm(cfg.norm, cfg.d_model, **norm)
        self.mlp = L.Mlp(cfg, rngs=rngs, out_std=out_std, dtype=dtype, param_dtype=pdtype)
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x, mask, positions, key=None, cache=None, causal=False):
        keys = jax.random.split(key, 3) if key is not None else (None,) * 3
        h = self.attn(self.attn_norm(x), mask, positions, keys[0], cache=cache, causal=causal)
        if cache is not None:
            h, cache = h
        x = x + L.dropout(h, self.dropout_rate, keys[1])
        h = self.mlp(self.mlp_norm(x))
        x = x + L.dropout(h, self.dropout_rate, keys[2])
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return x if cache is None else (x, cache)


class Decoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.token_embed = L.Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs,
                                   init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)
        if cfg.position == "learned":
            self.pos_embed = L.Embed(cfg.max_len, cfg.d_model, ("position", "embed"), rngs=rngs,
                                     init_std=cfg.init_std / 2, dtype=dtype, param_dtype=pdtype)
        elif cfg.position == "rope":
            self.pos_embed = None
        else:
            raise ValueError(f"model.position={cfg.position!r} is not one of 'learned', 'rope'.")

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderBlock(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = L.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                                      rngs=rngs, dtype=dtype, param_dtype=pdtype)
        self.lm_head = None if cfg.tie_embeddings else L.Linear(
            (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False, rngs=rngs,
            init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)

    def __call__(self, tokens, segment_ids=None, positions=None, dropout_key=None, cache=None):
        """With a `cache` (from `init_cache`), `tokens` are written at its column `cache["index"]`
        and attend to every valid earlier column; returns (logits, updated cache)."""
        if cache is None:
            return self.head(self.hidden(tokens, segment_ids, positions, dropout_key))
        segment_ids, positions, x, _ = self._embed(tokens, segment_ids, positions, None)
        return self._decode(x, segment_ids, positions, cache)

    def _embed(self, tokens, segment_ids, positions, dropout_key):
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        keys = (jax.random.split(dropout_key, cfg.num_layers + 1) if dropout_key is not None
                else None)
        x = self.token_embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = L.dropout(x, cfg.dropout_rate, None if keys is None else keys[-1])
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return segment_ids, positions, x, keys

    def hidden(self, tokens, segment_ids=None, positions=None, dropout_key=None):
        """The final normalised hidden states [batch, length, d_model]: what `head` turns into
        logits (the chunked loss applies `head` a slice of positions at a time)."""
        cfg = self.cfg
        segment_ids, positions, x, keys = self._embed(tokens, segment_ids, positions, dropout_key)
        # Splash builds its causal mask from the segment ids inside the kernel.
        mask = (segment_ids if cfg.attention == "splash"
                else L.attention_mask(segment_ids, segment_ids, causal=True))
        return self.final_norm(self._blocks(x, mask, positions,
                                            None if keys is None else keys[:-1], causal=True))

    def _blocks(self, x, mask, positions, keys, *, causal: bool):
        """The scanned (and rematerialised) blocks under `mask`; `keys`: one dropout key per layer
        or None; `causal`: `mask` lets no query see a later key."""
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.layers)

        def block(x, layer):
            state, key = layer
            return nnx.merge(graphdef, state)(x, mask, positions, key, causal=causal), None

        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            block = jax.checkpoint(block, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(block, x, (stacked, keys))
        return x

    def head(self, x):
        """float32 logits [..., vocab] from final hidden states."""
        if self.lm_head is None:
            logits = self.token_embed.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def _decode(self, x, segment_ids, positions, cache, prefix: int = 0):
        """The scanned layers over a KV cache: each layer's slice of the stacked cache goes in as
        a scan input and its updated slice comes out as a scan output. The first `prefix` columns
        (an image prefix, models/multimodal.py) attend to each other bidirectionally."""
        index, t = cache["index"], x.shape[1]
        # A column holds a real token once written with a non-zero segment id; padding columns
        # (left or right of a prompt) stay invalid, so they are never attended to.
        valid = jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0, (0, index))
        columns = jnp.arange(valid.shape[1])
        rows = (index + jnp.arange(t))[:, None]
        causal = columns[None, :] <= rows  # [t, cache_len]
        if prefix:
            causal |= (columns[None, :] < prefix) & (rows < prefix)
        mask = (valid[:, None, :] & causal[None])[:, None, None]
        graphdef, stacked = nnx.split(self.layers)

        def block(x, layer):
            state, k, v = layer
            return nnx.merge(graphdef, state)(x, mask, positions, cache=(k, v, index))

        x, (k, v) = jax.lax.scan(block, x, (stacked, cache["k"], cache["v"]))
        new = {"k": constrain(k, STACKED_CACHE_AXES), "v": constrain(v, STACKED_CACHE_AXES),
               "index": index + t, "valid": valid}
        return self.head(self.final_norm(x)), new


STACKED_CACHE_AXES = (None,) + L.CACHE_AXES  # [layers, batch, length, kv_heads, head_dim]


def init_cache(cfg, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache for `batch` rows of up to `length` tokens, stacked over the layers.

    k, v: [layers, batch, length, kv_heads, head_dim] in the compute dtype; index: the next column
    to write (shared by all rows); valid: [batch, length], True where a real token was written."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or dtype_of(cfg.dtype)
    zeros = constrain(jnp.zeros(shape, dtype), STACKED_CACHE_AXES)
    return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32),
            "valid": jnp.zeros((batch, length), bool)}
