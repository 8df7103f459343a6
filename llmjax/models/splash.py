"""Splash attention: the Pallas TPU flash-attention kernel, for the decoder's causal attention.

`splash_attention(q, k, v, segment_ids)` computes what `layers.dot_product_attention` computes
with `layers.attention_mask(segment_ids, segment_ids, causal=True)`, without materialising the
[length, length] logits: the kernel walks the causal mask block by block and skips the blocks
above the diagonal. Packed rows go in as segment ids; grouped-query attention is the kernel's own
(query head h reads key/value head h // (heads // kv_heads), the layout of the reference).

Under a mesh (`jax.set_mesh`) the kernel runs per device inside `shard_map`: the batch split like
`act_batch` (data, fsdp), the heads like `act_heads` (tensor), the sequence whole on every device.
Off TPU (or with no TPU mesh) the same kernel code runs in Pallas interpret mode, which is how the
CPU tests check its numerics; that is slow and meant for tests only.

Limits: causal self-attention only (no encoder, no cross-attention, no KV cache: decoding uses
the portable path), no attention dropout, and a sequence length that is a multiple of 128.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from llmjax import sharding

LANES = 128  # the kernel's key blocks are a multiple of the TPU lane width
BLOCKS = (512, 256, 128)  # tile sizes tried, largest first (MaxText's default tile is 512)


def unsupported_reason(seq_len: int | None = None, dropout_rate: float = 0.0) -> str | None:
    """Why splash cannot run this attention (one sentence naming what to set instead), or None."""
    if dropout_rate:
        return (f"model.attention='splash' has no attention dropout (model.dropout_rate="
                f"{dropout_rate}); set model.dropout_rate=0 or model.attention='xla'.")
    if seq_len is not None and seq_len % LANES:
        return (f"model.attention='splash' needs a sequence length that is a multiple of {LANES} "
                f"(got {seq_len}); set seq_len to one or model.attention='xla'.")
    return None


def target_platform() -> str:
    """The platform the current trace compiles for: the context mesh's devices ('tpu' when
    compiling ahead of time for a TPU topology on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def block_sizes(seq_len: int) -> kernel_lib.BlockSizes:
    """One tile size for every phase: the largest of BLOCKS that divides the sequence."""
    block = next(b for b in BLOCKS if seq_len % b == 0)
    return kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)


def _kernel_specs(q_shape, kv_shape):
    """(q/out spec, k/v spec, segment-ids spec) for [b, heads, length, head_dim] arrays under the
    context mesh and logical rules: batch like act_batch, heads like act_heads / act_kv_heads,
    length and head_dim whole (the kernel cannot split the key sequence)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = tuple(core_spmd.get_logical_axis_rules()) or sharding.DEFAULT_RULES
    mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    q_spec = sharding.logical_to_spec(("act_batch", "act_heads", None, None), q_shape, mesh_shape,
                                      rules)
    kv_spec = sharding.logical_to_spec(("act_batch", "act_kv_heads", None, None), kv_shape,
                                       mesh_shape, rules)
    return q_spec, kv_spec, P(q_spec[0], None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     interpret: bool | None = None) -> jax.Array:
    """Causal (grouped-query) attention of q [b, l, heads, d] over k, v [b, l, kv_heads, d] with
    packed-row `segment_ids` [b, l] (0: padding); returns [b, l, heads, d] in q's dtype.

    Queries are scaled by head_dim**-0.5 before the kernel, as the reference does. `interpret`:
    None runs the compiled kernel on TPU and Pallas interpret mode elsewhere."""
    b, length, heads, head_dim = q.shape
    reason = unsupported_reason(length)
    if reason:
        raise ValueError(reason)
    if interpret is None:
        interpret = target_platform() != "tpu"
    q = q * (1.0 / math.sqrt(head_dim))
    # The reference lets a padding query (segment 0) see only itself; giving each padding token
    # its own negative id does the same here, so even padding rows match (and none is empty).
    ids = jnp.where(segment_ids == 0, -1 - jnp.arange(length, dtype=jnp.int32),
                    segment_ids.astype(jnp.int32))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, heads, l, d]: the kernel's layout
    sizes = block_sizes(length)

    def attend(q, k, v, ids):
        mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * q.shape[1])
        splash = kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1,
                                            q_seq_shards=1, interpret=interpret)
        return jax.vmap(splash)(q, k, v, kernel_lib.SegmentIds(q=ids, kv=ids))

    if jax.sharding.get_abstract_mesh().empty:
        out = attend(q, k, v, ids)
    else:
        q_spec, kv_spec, ids_spec = _kernel_specs(q.shape, k.shape)
        if kv_spec[1] != q_spec[1]:
            # The kernel maps local query head h to local kv head h // groups, which holds only
            # when both are split alike; otherwise give every query head its own kv head.
            k, v = (jnp.repeat(x, heads // x.shape[1], axis=1) for x in (k, v))
            kv_spec = q_spec
        out = jax.shard_map(attend, in_specs=(q_spec, kv_spec, kv_spec, ids_spec),
                            out_specs=q_spec, check_vma=False)(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)
