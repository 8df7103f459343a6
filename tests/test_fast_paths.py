"""Every fast path gives the plain path's loss and gradients: the one-pass cross-entropy, the
chunked loss, the named remat policies and bfloat16 compute (docs/performance.md)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax import losses, sharding, steps
from llmjax.models import ModelConfig, build_model
from llmjax.models.decoder import REMAT_POLICIES
from tests.helpers import synthetic_batches, tiny_config


def test_cross_entropy_matches_optax_and_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 5)))
    targets = targets.at[0, :3].set(logits[0, :3].argmax(-1))  # some correct predictions
    weights = jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32)

    def ours(x):
        return losses.cross_entropy(x, targets, weights)[0]

    def plain(x):
        return (optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights).sum()

    loss, count, correct = losses.cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(loss, plain(logits), rtol=1e-6)
    assert count == weights.sum()
    assert correct == ((logits.argmax(-1) == targets) * weights).sum()
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(plain)(logits), atol=1e-6)


def _model(**overrides):
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32,
                      **overrides)
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_gives_the_same_loss_and_gradients(tied):
    graphdef, params = _model(tie_embeddings=tied, position="rope" if not tied else "learned")
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 16)))
    targets = jnp.roll(tokens, -1, 1)
    weights = jnp.asarray(rng.integers(0, 2, (2, 16)), jnp.float32)

    def whole(p):
        return losses.cross_entropy(nnx.merge(graphdef, p)(tokens), targets, weights)

    def chunked(p):
        model = nnx.merge(graphdef, p)
        return losses.chunked_cross_entropy(model.head, model.hidden(tokens), targets, weights, 4)

    want, got = whole(params), chunked(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_array_equal(got[1:], want[1:])
    g_want = jax.grad(lambda p: whole(p)[0])(params)
    g_got = jax.grad(lambda p: chunked(p)[0])(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), g_got, g_want)
    with pytest.raises(ValueError, match="does not divide the sequence length 16"):
        losses.chunked_cross_entropy(nnx.merge(graphdef, params).head,
                                     nnx.merge(graphdef, params).hidden(tokens), targets, weights, 5)


def _train(config, devices, n=3):
    mesh = sharding.make_mesh(config.mesh.shape, devices[:int(np.prod(config.mesh.shape))])
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        state, out = built.init(), []
        for batch in synthetic_batches(config, n):
            state, m = built.train_step(state, sharding.global_batch(batch, built.batch_sharding))
            out.append({k: float(v) for k, v in m.items()})
        return out, jax.tree.map(np.asarray, state["params"])


def test_chunked_loss_trains_like_the_whole_loss(devices):
    base, p_base = _train(tiny_config(), devices)
    chunked, p_chunked = _train(tiny_config(loss_chunk=4, **{"mesh.shape": (2, 2, 2)}), devices)
    for a, b in zip(base, chunked):
        for key in ("loss", "grad_norm", "accuracy"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p_chunked, p_base)


def test_bad_loss_chunk_is_one_sentence(devices):
    mesh = sharding.make_mesh((1, 1, 1), devices[:1])
    with pytest.raises(ValueError, match="loss_chunk=5 does not divide seq_len=16"):
        steps.validate(tiny_config(loss_chunk=5), mesh, ModelConfig.from_config(tiny_config().model))


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_every_remat_policy_gives_the_same_gradients(policy):
    graphdef, params = _model(position="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
                              tie_embeddings=False, num_kv_heads=2)
    remat_graphdef, _ = _model(position="rope", norm="rmsnorm", activation="swiglu",
                               use_bias=False, tie_embeddings=False, num_kv_heads=2,
                               remat_policy=policy)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 8)))
    grads = [jax.grad(lambda p, g=g: nnx.merge(g, p)(tokens).mean())(params)
             for g in (graphdef, remat_graphdef)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)


def test_named_policies_save_what_they_name():
    """What the backward pass keeps of the scanned layers (stacked [layers, batch, length, ...]),
    beyond each layer's input (d_model): q, k, v ([.., heads, head_dim]) under `save_qkv_proj`,
    the attention output projection under `save_out_proj`, those and the context under
    `save_dot_except_mlp`, and under `minimal` the projections the backward pass reads (the MLP
    output only feeds a sum, so it is not kept): the tags are where the policies look."""
    from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 8)))

    def saved(policy):
        graphdef, params = _model(remat_policy=policy)
        found = saved_residuals(lambda p: nnx.merge(graphdef, p)(tokens).mean(), params)
        return sorted(a.shape[3:] for a, why in found if why.startswith("output of scan"))

    heads, embed, mlp = (4, 8), (32,), (64,)
    assert saved("full") == [embed]
    assert saved("save_out_proj") == [embed, embed]
    assert saved("save_qkv_proj") == [heads] * 3 + [embed]
    assert saved("save_dot_except_mlp") == [heads] * 4 + [embed, embed]
    assert saved("minimal") == [heads] * 3 + [embed, embed, mlp]


def test_bfloat16_step_follows_the_float32_step(devices):
    """bfloat16 compute (float32 parameters, optimizer state and accumulation) tracks float32:
    same loss and gradient norm to bfloat16 precision."""
    f32, _ = _train(tiny_config(), devices)
    bf16, _ = _train(tiny_config(**{"model.dtype": "bfloat16"}), devices)
    for a, b in zip(f32, bf16):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=5e-2)


def test_xla_flags_are_known_and_the_environment_wins():
    """Every default flag is one this jaxlib knows (an unknown flag aborts JAX at start-up), and
    a flag the user already set keeps the user's value."""
    import os
    import subprocess
    import sys

    from llmjax import xla_flags
    merged = xla_flags.with_defaults("--xla_gpu_enable_latency_hiding_scheduler=false --foo=1")
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in merged
    assert merged.count("xla_gpu_enable_latency_hiding_scheduler") == 1
    assert "--xla_gpu_enable_pipelined_all_gather=true" in merged
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    code = ("from llmjax import xla_flags; xla_flags.apply(); import jax, jax.numpy as jnp; "
            "print(float(jax.jit(lambda x: x * 2)(jnp.ones(())))); "
            "import os; print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "2.0"
    assert "xla_gpu_enable_while_loop_double_buffering=true" in out.stdout


@pytest.mark.parametrize("n_in", [1, 2])
def test_low_precision_matmuls_match_float32(n_in):
    """The bfloat16 matmuls with float32 accumulation in all three products (forward, input and
    kernel gradients) agree with float32 autodiff to bfloat16 precision, and the kernel gradient
    keeps the kernel's float32."""
    from llmjax.models.layers import low_precision_attend, low_precision_dense
    rng = np.random.default_rng(4)
    x_shape, k_shape, spec = {1: ((2, 5, 3), (3, 12), "bti,io->bto"),
                              2: ((2, 5, 3, 4), (3, 4, 12), "bthk,hko->bto")}[n_in]
    x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)

    def check(ours, ref, *args):
        got = jax.grad(lambda *a: (ours(*a).astype(jnp.float32) ** 2).sum(), (0, 1))(*args)
        want = jax.grad(lambda *a: (ref(*a) ** 2).sum(), (0, 1))(*args)
        assert got[1].dtype == jnp.float32 and got[0].dtype == jnp.bfloat16
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=3e-2,
                                       atol=3e-2 * float(jnp.abs(w).max()))

    check(lambda x, k: low_precision_dense(x, k, n_in),
          lambda x, k: jnp.einsum(spec, x.astype(jnp.float32), k), x, k)
    table = jnp.asarray(rng.normal(size=(7, x.shape[-1])), jnp.float32)
    check(low_precision_attend, lambda x, t: jnp.einsum("...d,vd->...v", x.astype(jnp.float32), t),
          x, table)


def test_low_precision_einsum_and_bias_match_float32():
    """The attention contractions of a bfloat16 model (float32 accumulation in the backward
    einsums too) and the bias whose gradient is summed in float32 agree with float32 autodiff."""
    from llmjax.models.layers import add_bias, low_precision_einsum
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.normal(size=(2, 3, 6, 4)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    for spec in ("bkqd,bksd->bkqs", "bkqd,bksd->bksq"):
        got = jax.grad(lambda a, b: (low_precision_einsum(spec, a, b) ** 2).sum(), (0, 1))(a, b)
        want = jax.grad(lambda a, b: (jnp.einsum(spec, a, b) ** 2).sum(), (0, 1))(f32(a), f32(b))
        for g, w in zip(got, want):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_allclose(f32(g), w, rtol=3e-2, atol=3e-2 * float(jnp.abs(w).max()))
    y = jnp.asarray(rng.normal(size=(4, 300, 6)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    got = jax.grad(lambda bias: (f32(add_bias(y, bias)) ** 2).sum())(bias)
    want = jax.grad(lambda bias: ((f32(y) + bias.astype(jnp.bfloat16)) ** 2).sum())(bias)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_a_plain_float64_reference(heads, kv_heads):
    """The heads-major attention (query groups merged into rows) against a per-head loop in
    float64, with a padded, packed mask and an additive bias."""
    from llmjax.models.layers import attention_mask, dot_product_attention
    rng = np.random.default_rng(6)
    b, t, d = 2, 7, 8
    q = rng.normal(size=(b, t, heads, d))
    k, v = rng.normal(size=(2, b, t, kv_heads, d))
    bias = rng.normal(size=(b, heads, t, t))
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(seg), causal=True)
    got = dot_product_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask,
                                jnp.asarray(bias, jnp.float32)[:, :, None].reshape(
                                    b, kv_heads, heads // kv_heads, t, t))
    m = np.asarray(mask)[:, 0, 0]
    want = np.zeros_like(q)
    for i in range(b):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            logits = q[i, :, h] @ k[i, :, kh].T / np.sqrt(d) + bias[i, h]
            logits = np.where(m[i], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            want[i, :, h] = (p / p.sum(-1, keepdims=True)) @ v[i, :, kh]
    real = seg != 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5)


@pytest.mark.parametrize("block", [3, 4, 16])
def test_causal_blocks_give_the_whole_attention(block):
    """Causal attention a block of query rows at a time (the masked upper triangle skipped) gives
    the whole attention's outputs and gradients, with packed and padded rows, grouped-query heads
    and a block that does not divide the length."""
    from llmjax.models.layers import attention_mask, causal_attention, dot_product_attention
    rng = np.random.default_rng(7)
    b, t, d = 2, 10, 8
    q = jnp.asarray(rng.normal(size=(b, t, 4, d)), jnp.float32)
    k, v = jnp.asarray(rng.normal(size=(2, b, t, 2, d)), jnp.float32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [1] * 10])
    mask = attention_mask(seg, seg, causal=True)
    whole = lambda q, k, v: dot_product_attention(q, k, v, mask)  # noqa: E731
    blocked = lambda q, k, v: causal_attention(q, k, v, mask, block)  # noqa: E731
    np.testing.assert_allclose(blocked(q, k, v), whole(q, k, v), atol=1e-6)
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()  # noqa: E731
    got = jax.grad(loss(blocked), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(whole), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
