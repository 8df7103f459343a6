"""KV-cache decoding: the cache reproduces the full forward pass; sampling rules; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import generate as gen
from llmjax import sharding, steps
from llmjax.models.decoder import init_cache
from tests.helpers import tiny_config


@functools.lru_cache(maxsize=None)
def make(style, mesh_shape=(1, 1, 1), devices=None):
    """(built, params, mesh, rules), shared by the tests (building and compiling cost seconds)."""
    overrides = {"model.max_len": 48}
    if style == "llama":
        overrides["model.num_kv_heads"] = 2  # grouped-query: 4 query heads per kv head
    config = tiny_config(style, **overrides)
    mesh = sharding.make_mesh(mesh_shape, devices or jax.devices()[:int(np.prod(mesh_shape))])
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        params = built.init()["params"]
    return built, params, mesh, sharding.rules_from_config(config.sharding_rules)


def incremental_logits(built, params, tokens, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time; logits of every position."""
    model = nnx.merge(built.graphdef, params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    ones = jnp.ones((b, t), jnp.int32)
    cache = init_cache(built.model_cfg, b, t + 3)  # spare columns stay invalid
    step = jax.jit(lambda c, x, s, p: model(x, s, p, cache=c))
    out, cache = step(cache, tokens[:, :prefill], ones[:, :prefill], positions[:, :prefill])
    outs = [out]
    for i in range(prefill, t):
        out, cache = step(cache, tokens[:, i:i + 1], ones[:, i:i + 1], positions[:, i:i + 1])
        outs.append(out)
    assert int(cache["index"]) == t
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_cache_gives_the_full_forward_logits(devices, style):
    built, params, _, _ = make(style)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 12)), jnp.int32)
    full = jax.jit(lambda p, x: nnx.merge(built.graphdef, p)(x))(params, tokens)
    cached = incremental_logits(built, params, tokens, prefill=5)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_cache_on_the_8_device_mesh_matches_one_device(devices, style):
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 128, (4, 10)), jnp.int32)
    built1, params1, _, _ = make(style)
    reference = jax.jit(lambda p, x: nnx.merge(built1.graphdef, p)(x))(params1, tokens)
    built8, params8, mesh, rules = make(style, (2, 2, 2), tuple(devices))
    # Same seed, same values: the sharded init is the one-device init, split over devices.
    with sharding.use_mesh(mesh, rules):
        cached = incremental_logits(built8, params8, tokens, prefill=4)
        prompts = [list(r) for r in np.asarray(tokens[:, :6])]
        sharded = gen.Generator(built8.graphdef, built8.model_cfg).generate(
            params8, prompts, max_new_tokens=5)
    assert params8["layers"]["attn"]["query"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    np.testing.assert_allclose(cached, reference, atol=2e-5, rtol=1e-5)
    single = generator(style).generate(make(style)[1], prompts, max_new_tokens=5)
    assert sharded.tokens == single.tokens


@functools.lru_cache(maxsize=None)
def generator(style):
    built = make(style)[0]
    return gen.Generator(built.graphdef, built.model_cfg)


def greedy_reference(built, params, prompt, n):
    """Greedy decoding by full forward passes, no cache."""
    ids = list(prompt)
    model = jax.jit(lambda p, x: nnx.merge(built.graphdef, p)(x))
    for _ in range(n):
        tokens = np.zeros((1, 32), np.int32)  # causal: what follows the end changes nothing
        tokens[0, :len(ids)] = ids
        ids.append(int(model(params, tokens)[0, len(ids) - 1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(devices, style):
    built, params, _, _ = make(style)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 128, n).tolist() for n in (3, 9, 1, 17)]
    g = generator(style)
    alone = [greedy_reference(built, params, p, 6) for p in prompts]
    for padding in ("left", "right"):
        batched = g.generate(params, prompts, max_new_tokens=6, padding=padding)
        assert batched.tokens == alone, padding
    assert g.generate(params, prompts[1:2], max_new_tokens=6).tokens == alone[1:2]


def test_sampling_rules(devices):
    built, params, _, _ = make("gpt")
    g = generator("gpt")
    prompts = [[5, 6, 7], [9, 3]]
    greedy = g.generate(params, prompts, max_new_tokens=8)
    top1 = g.generate(params, prompts, max_new_tokens=8,
                      sampling=gen.Sampling(temperature=1.5, top_k=1), seed=3)
    assert top1.tokens == greedy.tokens
    hot = gen.Sampling(temperature=2.0)
    a = g.generate(params, prompts, max_new_tokens=8, sampling=hot, seed=7)
    b = g.generate(params, prompts, max_new_tokens=8, sampling=hot, seed=7)
    c = g.generate(params, prompts, max_new_tokens=8, sampling=hot, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens

    # Stop tokens: the row ends before its first stop token; the other rows go on.
    stop = greedy.tokens[0][3]
    first = greedy.tokens[0].index(stop)
    stopped = g.generate(params, prompts, max_new_tokens=8, stop_ids=[stop])
    assert stopped.tokens[0] == greedy.tokens[0][:first] and stopped.stopped[0]
    if stop not in greedy.tokens[1]:
        assert stopped.tokens[1] == greedy.tokens[1] and not stopped.stopped[1]


def test_filter_logits_against_numpy(devices):
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.2] * 5], np.float32))
    neg = np.finfo(np.float32).min
    kept = lambda out: (np.asarray(out) > neg / 2).tolist()
    assert kept(gen.filter_logits(jnp.asarray(logits), 2, 1.0))[0] == [0, 1, 0, 1, 0]
    # top_p 0.6: 0.4 then 0.25 reach 0.65 >= 0.6, so exactly those two stay.
    assert kept(gen.filter_logits(jnp.asarray(logits), 0, 0.6))[0] == [0, 1, 0, 1, 0]
    assert kept(gen.filter_logits(jnp.asarray(logits), 0, 0.66))[0] == [0, 1, 0, 1, 1]
    assert kept(gen.filter_logits(jnp.asarray(logits), 0, 0.01))[0] == [0, 1, 0, 0, 0]
    assert sum(kept(gen.filter_logits(jnp.asarray(logits), 3, 0.9))[0]) == 3


def test_bad_prompts(devices):
    built, params, _, _ = make("gpt")
    g = generator("gpt")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        g.generate(params, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 has 48 tokens but the model's context is "
                                         "model.max_len=48"):
        g.generate(params, [[1] * 48], max_new_tokens=2)
    with pytest.raises(ValueError, match="sampling settings"):
        gen.Sampling(top_p=0.0)
    # The new tokens are cut to what fits the context.
    out = g.generate(params, [[1] * 40], max_new_tokens=20)
    assert len(out.tokens[0]) == 8


def test_decode_benchmark_reports_consistent_figures(capsys):
    """generate.benchmark (the --benchmark figures): the speeds follow from the measured times."""
    built, params, mesh, rules = make("gpt")
    run = gen.Run(None, built.model_cfg, built.graphdef, params, None, 0, mesh, rules)
    rows = gen.benchmark(run, batch_sizes=(1, 2), prompt_len=4, new_tokens=6, repeats=1)
    assert [(r["batch"], r["prompt_len"], r["new_tokens"]) for r in rows] == [(1, 4, 6), (2, 4, 6)]
    for r in rows:
        decode_s = r["batch"] * 6 / r["decode_tokens_per_sec"]
        assert r["per_token_ms"] == pytest.approx(1e3 * decode_s / 6, rel=1e-2)
        total_s = r["batch"] * 6 / r["tokens_per_sec"]
        assert total_s == pytest.approx(decode_s + r["prefill_ms"] / 1e3, rel=1e-2, abs=2e-5)
    gen.print_benchmark(rows, "decode", "prefill", "prompt_len", "prefill_ms")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("decode batch 1: ") and "prefill of 4 tokens" in lines[0]
