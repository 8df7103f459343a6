"""The decoder model: published parameter counts, numerics against a plain reference, packing."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import steps
from llmjax.models import ModelConfig, build_model

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"

PUBLISHED = {  # total unique trainable parameters of the published models
    "gpt_small": 124_439_808,
    "gpt_medium": 354_823_168,
    "gpt_large": 774_030_080,
    "gpt_xl": 1_557_611_200,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
}


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    config = load_config(name)
    assert steps.count_params(ModelConfig.from_config(config.model))["params"] == PUBLISHED[name]


def test_gpt3_is_175b():
    n = steps.count_params(ModelConfig.from_config(load_config("gpt3_175b").model))["params"]
    assert abs(n - 175e9) / 175e9 < 0.003, n


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["gpt3_175b"])
def test_runlocal_keeps_architecture(name):
    full, local = load_config(name).model, load_config(name, "runlocal").model
    for key in ("position", "norm", "activation", "use_bias", "tie_embeddings"):
        assert full[key] == local[key]
    full_cfg, local_cfg = ModelConfig.from_config(full), ModelConfig.from_config(local)
    assert (full_cfg.num_heads == full_cfg.num_kv_heads) == (local_cfg.num_heads == local_cfg.num_kv_heads)
    assert steps.count_params(local_cfg)["params"] < 3_000_000


TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32)
GPT = ModelConfig(**TINY)
LLAMA = ModelConfig(**TINY, num_kv_heads=2, position="rope", rope_theta=500.0, norm="rmsnorm",
                    activation="swiglu", use_bias=False, tie_embeddings=False)


def make(cfg, seed=0):
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(seed))
    return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def reference_forward(cfg, p, tokens):
    """A plain float64 numpy decoder, one layer at a time, written from the papers."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    L, t = cfg.num_layers, tokens.shape[1]
    x = p["token_embed"]["embedding"][tokens]
    pos = np.arange(t)
    if cfg.position == "learned":
        x = x + p["pos_embed"]["embedding"][pos]

    def norm(x, w):
        if cfg.norm == "layernorm":
            y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.norm_eps)
            return y * w["scale"] + w.get("bias", 0.0)
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w["scale"]

    def dense(x, w, n_in=1):
        y = np.tensordot(x, w["kernel"], axes=n_in)
        return y + w["bias"] if "bias" in w else y

    def rope(x):
        h = x.shape[-1] // 2
        freq = cfg.rope_theta ** (-np.arange(h) * 2.0 / x.shape[-1])
        ang = pos[:, None] * freq
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    gelu = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    for i in range(L):
        lp = jax.tree.map(lambda a: a[i], p["layers"])
        h = norm(x, lp["attn_norm"])
        q, k, v = (dense(h, lp["attn"][n]) for n in ("query", "key", "value"))
        if cfg.position == "rope":
            q, k = rope(q), rope(k)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + dense(np.einsum("bhqk,bkhd->bqhd", a, v), lp["attn"]["out"], 2)
        h = norm(x, lp["mlp_norm"])
        if cfg.activation == "gelu":
            m = gelu(dense(h, lp["mlp"]["wi"]))
        else:
            g = dense(h, lp["mlp"]["wi_gate"])
            m = g / (1 + np.exp(-g)) * dense(h, lp["mlp"]["wi"])
        x = x + dense(m, lp["mlp"]["wo"])
    x = norm(x, p["final_norm"])
    if cfg.tie_embeddings:
        return x @ p["token_embed"]["embedding"].T
    return dense(x, p["lm_head"])


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama_gqa"])
def test_matches_float64_reference(cfg):
    model, params = make(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    got = np.asarray(model(jnp.asarray(tokens)))
    want = reference_forward(cfg, params, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama_gqa"])
def test_packed_segments_do_not_attend_across(cfg):
    """Changing one packed document leaves the other documents' logits unchanged, and each packed
    document's logits equal those of the document run alone."""
    model, _ = make(cfg)
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, cfg.vocab_size, n) for n in (5, 7, 4)]
    tokens = np.concatenate(docs)
    segs = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
    pos = np.concatenate([np.arange(len(d)) for d in docs])
    pad = 20 - len(tokens)
    tokens, segs, pos = (np.pad(a, (0, pad))[None] for a in (tokens, segs, pos))
    base = np.asarray(model(jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos)))

    changed = tokens.copy()
    changed[0, 5:12] = rng.integers(1, cfg.vocab_size, 7)  # the second document
    out = np.asarray(model(jnp.asarray(changed), jnp.asarray(segs), jnp.asarray(pos)))
    keep = (segs[0] == 1) | (segs[0] == 3)
    np.testing.assert_array_equal(out[0, keep], base[0, keep])
    assert not np.allclose(out[0, segs[0] == 2], base[0, segs[0] == 2])

    alone = np.asarray(model(jnp.asarray(docs[2][None])))
    np.testing.assert_allclose(base[0, 12:16], alone[0], atol=1e-5)


def test_padding_does_not_change_real_positions():
    model, _ = make(LLAMA)
    tokens = np.random.default_rng(2).integers(1, 64, (1, 10))
    short = np.asarray(model(jnp.asarray(tokens)))
    padded = np.pad(tokens, ((0, 0), (0, 6)))
    segs = np.pad(np.ones_like(tokens), ((0, 0), (0, 6)))
    pos = np.pad(np.arange(10)[None], ((0, 0), (0, 6)))
    long = np.asarray(model(jnp.asarray(padded), jnp.asarray(segs), jnp.asarray(pos)))
    np.testing.assert_allclose(long[:, :10], short, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = ModelConfig(**TINY, dtype="bfloat16")
    model, params = make(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = model(jnp.ones((1, 8), jnp.int32))
    assert out.dtype == jnp.float32
    ref = make(ModelConfig(**TINY))[0](jnp.ones((1, 8), jnp.int32))
    np.testing.assert_allclose(out, ref, atol=5e-2)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_gradients(policy):
    import dataclasses
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 8)))

    def grads(cfg):
        model, params = make(cfg)
        graphdef = nnx.graphdef(model)
        loss = lambda p: nnx.merge(graphdef, p)(tokens).mean()
        return jax.grad(loss)(params)

    base, remat = grads(LLAMA), grads(dataclasses.replace(LLAMA, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), base, remat)


def test_bad_model_configs_name_the_key():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(**TINY, remat_policy="sometimes")
    with pytest.raises(ValueError, match="attention='cudnn' needs model.dtype bfloat16"):
        ModelConfig(**TINY, attention="cudnn")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_config({**TINY, "n_layers": 2})
