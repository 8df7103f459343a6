"""Splash attention (the Pallas TPU kernel): numerics in Pallas interpret mode on the CPU against
the reference attention, in the decoder's train step, the per-platform choice of
model.attention='auto', and an ahead-of-time compile for a TPU topology (needs libtpu)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import sharding, steps
from llmjax.models import ModelConfig, build_model, resolve_attention
from llmjax.models import layers as L
from llmjax.models.splash import splash_attention
from tests.helpers import synthetic_batches, tiny_config


def packed_segments(batch, length, rng):
    """Rows of 1-3 documents with a padded tail (segment 0), and one unpacked row."""
    rows = [np.ones(length, np.int32)]
    for _ in range(batch - 1):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), 2, replace=False))
        row = np.searchsorted(cuts, np.arange(length), side="right").astype(np.int32) + 1
        row[length - int(rng.integers(1, 20)):] = 0
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def qkv(batch, length, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                   [(batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
                    (batch, length, kv_heads, head_dim), (batch, length, heads, head_dim)])
    return q, k, v, ct, packed_segments(batch, length, rng)


def outputs_and_grads(attend, q, k, v, ct):
    """attend(q, k, v) and the gradients of <attend(q, k, v), ct> w.r.t. q, k, v."""
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) * ct)
    return jax.jit(attend)(q, k, v), jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)


def assert_matches_reference(q, k, v, ct, seg):
    mask = L.attention_mask(seg, seg, causal=True)
    ref_out, ref_grads = outputs_and_grads(lambda q, k, v: L.dot_product_attention(q, k, v, mask),
                                           q, k, v, ct)
    out, grads = outputs_and_grads(lambda q, k, v: splash_attention(q, k, v, seg), q, k, v, ct)
    # Every row, padding included: each padding token sees only itself in both.
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("heads,kv_heads,length", [(4, 4, 128), (4, 2, 384)],
                         ids=["mha", "gqa-3-blocks"])
def test_splash_matches_reference_attention(heads, kv_heads, length):
    """Forward and gradients w.r.t. q, k, v, causal with packed rows and padding; 384 tokens are
    three 128-token tiles, so the kernel also skips blocks above the diagonal."""
    assert_matches_reference(*qkv(3, length, heads, kv_heads, 64))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["kv-split-over-tensor", "kv-repeated"])
def test_splash_under_a_mesh_matches_reference(devices, kv_heads):
    """shard_map over data=2 x tensor=4: 4 kv heads split like the query heads; 2 kv heads do not
    divide over tensor=4 and are repeated per query head."""
    mesh = sharding.make_mesh((2, 1, 4), devices)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        assert_matches_reference(*qkv(2, 128, 8, kv_heads, 64, seed=1))


def test_splash_rejects_what_it_cannot_do():
    q, k, v, _, seg = qkv(1, 100, 2, 2, 64)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(q, k, v, seg)
    tiny = dict(vocab_size=64, d_model=128, num_layers=1, num_heads=2, mlp_dim=64, max_len=128)
    with pytest.raises(ValueError, match="attention='splash' has no attention dropout"):
        ModelConfig(**tiny, attention="splash", dropout_rate=0.1)
    with pytest.raises(ValueError, match="supports model.attention='xla'"):
        ModelConfig(**dict(tiny, position="relative", activation="relu"), family="encoder",
                    attention="splash")
    with pytest.raises(ValueError, match="multiple of 128"):
        resolve_attention(ModelConfig(**tiny, attention="splash"), "tpu", seq_len=100)


def splash_config(attention, **overrides):
    """A tiny LLaMA-style decoder (grouped-query: 4 heads, 2 kv heads of 64) on 128-token rows."""
    return tiny_config("llama", seq_len=128, batch_size=4, **{
        "model.d_model": 256, "model.num_heads": 4, "model.num_kv_heads": 2, "model.max_len": 128,
        "model.attention": attention, **overrides})


def test_decoder_train_step_splash_equals_xla(devices):
    """The train step's loss and every parameter gradient of a tiny decoder on packed rows
    (float32), splash in interpret mode vs the portable path, on a data=2 x tensor=2 mesh."""
    config = splash_config("splash")
    batch = {k: jnp.asarray(v) for k, v in synthetic_batches(config, 1)[0].items()}
    mesh = sharding.make_mesh((2, 1, 2), devices[:4])
    results = {}
    for attention in ("splash", "xla"):
        model_cfg = ModelConfig.from_config(dict(config.model, attention=attention))
        with nnx.use_eager_sharding(False):
            graphdef, params = nnx.split(build_model(model_cfg, nnx.Rngs(params=0)))

        def loss(params, batch):  # as steps.build's train step scores a batch
            logits = steps.forward(nnx.merge(graphdef, params), batch)
            total, count, _ = steps.cross_entropy(logits, batch["targets"],
                                                  batch["weights"].astype(jnp.float32))
            return total / count

        with sharding.use_mesh(mesh, config.sharding_rules):
            results[attention] = jax.jit(jax.value_and_grad(loss))(params, batch)
    (value, grads), (ref_value, ref_grads) = results["splash"], results["xla"]
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4), grads,
                 ref_grads)


def test_auto_attention_resolves_per_platform(devices):
    decoder = ModelConfig(vocab_size=64, d_model=128, num_layers=1, num_heads=2, mlp_dim=64)
    assert decoder.attention == "auto"
    bf16 = dataclasses.replace(decoder, dtype="bfloat16")
    pick = lambda cfg, platform, seq_len=None: resolve_attention(cfg, platform, seq_len).attention
    assert pick(decoder, "cpu") == "xla"
    assert pick(decoder, "tpu") == pick(decoder, "tpu", 1024) == "splash"
    assert pick(decoder, "tpu", 1000) == "xla"  # not a multiple of 128
    assert pick(dataclasses.replace(decoder, dropout_rate=0.1), "tpu") == "xla"
    assert pick(bf16, "gpu") == pick(dataclasses.replace(bf16, dtype="float16"), "gpu") == "cudnn"
    assert pick(decoder, "gpu") == "xla"  # cuDNN's kernel takes bf16/fp16 only
    assert pick(dataclasses.replace(bf16, dropout_rate=0.1), "gpu") == "xla"
    assert pick(dataclasses.replace(bf16, head_dim=256), "gpu") == "xla"
    encoder = ModelConfig(family="encoder", vocab_size=64, d_model=128, num_layers=1, num_heads=2,
                          mlp_dim=64, activation="gelu_exact")
    assert pick(encoder, "tpu") == pick(dataclasses.replace(encoder, dtype="bfloat16"), "gpu") == "xla"
    for explicit in ("xla", "splash"):  # an explicit choice stays as given
        assert pick(dataclasses.replace(decoder, attention=explicit), "gpu") == explicit
    # steps.build resolves for the mesh's devices: here CPU, so the portable path.
    mesh = sharding.make_mesh((1, 1, 1), devices[:1])
    assert steps.build(tiny_config(), mesh).model_cfg.attention == "xla"


def test_splash_compiles_for_tpu_ahead_of_time():
    """The real Mosaic kernels (forward, dq, dkv) compiled for a v5p 2x2x1 topology from this CPU
    host, alone under shard_map and inside the tiny decoder's train step (attention='auto')."""
    pytest.importorskip("libtpu", reason="the TPU compiler (libtpu) is not installed: "
                                         "pip install 'jax[tpu]' to run the TPU compile checks")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    tpus = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    mesh = sharding.make_mesh((2, 1, 2), tpus)
    spec = P(("data", "fsdp"), None, "tensor")
    arg = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype,
                                                          sharding=NamedSharding(mesh, spec))
    args = (arg((4, 256, 4, 64), jnp.bfloat16, spec), arg((4, 256, 2, 64), jnp.bfloat16, spec),
            arg((4, 256, 2, 64), jnp.bfloat16, spec), arg((4, 256), jnp.int32, P(("data", "fsdp"))))
    loss = lambda q, k, v, seg: splash_attention(q, k, v, seg).astype(jnp.float32).sum()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(*args).compile()
    # One Mosaic custom call per kernel: forward, dkv and dq (interpret mode would leave none).
    assert compiled.as_text().count("tpu_custom_call") == 3

    config = splash_config("auto", **{"model.dtype": "bfloat16"})
    config.mesh.shape = (2, 1, 2)
    built = steps.build(config, mesh)
    assert built.model_cfg.attention == "splash"
    with sharding.use_mesh(mesh, config.sharding_rules):
        compiled = built.train_step.lower(built.abstract_state,
                                          steps.abstract_batch(config, built)).compile()
    assert "tpu_custom_call" in compiled.as_text()
