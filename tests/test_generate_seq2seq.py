"""Encoder-decoder decoding (cache, greedy, beam search), fill-mask and their command line."""

import functools
import itertools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import beam_search as bs
from llmjax import sharding, steps
from llmjax.fill_mask import fill_mask
from tests.family_helpers import tiny_train_config


@functools.lru_cache(maxsize=None)
def make(style, mesh_shape=(1, 1, 1), noise=0.0, vocab=64):
    """(built, params, mesh, rules) of a tiny model, shared by the tests. `noise` adds N(0, noise)
    to every parameter: the small init gives nearly flat logits (the same token every step)."""
    config = tiny_train_config(style, **{"model.vocab_size": vocab})
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices)
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        params = built.init()["params"]
    if noise:
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, noise, a.shape)
                              .astype(np.float32), params)
    return built, params, mesh, sharding.rules_from_config(config.sharding_rules)


def encoder_batch(rng, lengths, width=12):
    tokens = rng.integers(4, 64, (len(lengths), width)).astype(np.int32)
    segments = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    tokens *= segments
    positions = np.where(segments != 0, np.arange(width), 0).astype(np.int32)
    return tokens, segments, positions


def full_and_cached_logits(built, params, tokens, segments, positions, decoder, prefill):
    """The full forward pass's logits and those of the cache: `prefill` decoder tokens at once,
    then one per step."""
    graphdef = built.graphdef
    full = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a[:3], decoder_tokens=a[3]))(
        params, tokens, segments, positions, decoder)

    @jax.jit
    def start(p, tokens, segments, positions):
        model = nnx.merge(graphdef, p)
        return model.init_cache(model.encode(tokens, segments, positions), decoder.shape[1] + 2)

    @jax.jit
    def step(p, cache, x, pos):
        return nnx.merge(graphdef, p).decode(x, None, segments, decoder_positions=pos, cache=cache)

    b, t = decoder.shape
    cache = start(params, tokens, segments, positions)
    outs = []
    for lo, hi in [(0, prefill)] + [(i, i + 1) for i in range(prefill, t)]:
        pos = jnp.broadcast_to(jnp.arange(lo, hi), (b, hi - lo))
        out, cache = step(params, cache, decoder[:, lo:hi], pos)
        outs.append(out)
    assert int(cache["index"]) == t
    return np.asarray(full), np.asarray(jnp.concatenate(outs, axis=1))


@pytest.mark.parametrize("style", ["t5", "t5_v1_1", "bart"])
def test_cache_gives_the_full_forward_logits(devices, style):
    built, params, mesh, rules = make(style)
    rng = np.random.default_rng(0)
    tokens, segments, positions = encoder_batch(rng, [12, 7, 3, 9])
    decoder = rng.integers(4, 64, (4, 9)).astype(np.int32)
    full, cached = full_and_cached_logits(built, params, tokens, segments, positions, decoder, 3)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
    # Past T5's exact buckets (8 of 16 causal ones): the log-spaced relative buckets matter too.
    if style == "t5":
        decoder = rng.integers(4, 64, (4, 20)).astype(np.int32)
        full, cached = full_and_cached_logits(built, params, tokens, segments, positions, decoder, 1)
        np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["t5", "bart"])
def test_cache_on_the_8_device_mesh_matches_one_device(devices, style):
    rng = np.random.default_rng(1)
    tokens, segments, positions = encoder_batch(rng, [12, 5, 8, 2])
    decoder = rng.integers(4, 64, (4, 7)).astype(np.int32)
    built1, params1, _, _ = make(style)
    reference, _ = full_and_cached_logits(built1, params1, tokens, segments, positions, decoder, 2)
    built8, params8, mesh, rules = make(style, (2, 2, 2))
    assert params8["encoder"]["layers"]["attn"]["query"]["kernel"].sharding.spec != \
        jax.sharding.PartitionSpec()
    with sharding.use_mesh(mesh, rules):
        full, cached = full_and_cached_logits(built8, params8, tokens, segments, positions,
                                              decoder, 2)
        # The generator's sharded caches (beams included) decode as on one device.
        inputs = [list(r[s != 0]) for r, s in zip(tokens, segments)]
        g8 = bs.Seq2SeqGenerator(built8.graphdef, built8.model_cfg)
        greedy8 = g8.generate(params8, inputs, max_new_tokens=5, start_id=2, eos_id=3)
        beams8 = g8.generate(params8, inputs, max_new_tokens=5, start_id=2, eos_id=3, num_beams=2)
    np.testing.assert_allclose(full, reference, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(cached, reference, atol=2e-5, rtol=1e-5)
    g1 = bs.Seq2SeqGenerator(built1.graphdef, built1.model_cfg)
    assert greedy8.tokens == g1.generate(params1, inputs, max_new_tokens=5, start_id=2,
                                         eos_id=3).tokens
    assert beams8.tokens == g1.generate(params1, inputs, max_new_tokens=5, start_id=2, eos_id=3,
                                        num_beams=2).tokens


# ------------------------------------------------------------------------------------------------
# Search on a toy model whose next-token distribution depends on the whole prefix, through a
# cache that must follow its beam: brute force over every sequence is the reference.

V, STEPS, START = 4, 4, 0


def toy(eos, seed=0, scale=2.0):
    table = np.random.default_rng(seed).normal(0, scale, ((V + 1) ** (STEPS + 1), V))
    table = table.astype(np.float32)

    def step(tokens, i, cache):
        h = cache * (V + 1) + tokens + 1  # a unique code of the prefix
        return jnp.asarray(table)[h], h

    def logprobs(prefix):
        h = 0
        for t in (START,) + tuple(prefix):
            h = h * (V + 1) + t + 1
        return np.asarray(jax.nn.log_softmax(table[h]))

    return step, logprobs


def brute_force(logprobs, eos, alpha):
    """The best score over every output: ending in its first eos, or running out of steps."""
    best = (-np.inf, None)
    for n in range(1, STEPS + 1):
        for seq in itertools.product(range(V), repeat=n):
            if eos in seq[:-1] or (n < STEPS and seq[-1] != eos):
                continue
            lp = sum(logprobs(seq[:i])[t] for i, t in enumerate(seq))
            best = max(best, (lp / ((5 + n) / 6) ** alpha, seq))
    return best


def run_toy(step, num_beams, alpha, eos, batch=1):
    run = jax.jit(lambda: bs.beam_loop(
        step, lambda c, rows: c[rows], jnp.zeros(batch * num_beams, jnp.int32), batch=batch,
        num_beams=num_beams, steps=STEPS, start_id=START, eos_id=eos, alpha=alpha))
    seqs, lens, scores = jax.device_get(run())
    return [(float(scores[b, 0]), tuple(seqs[b, 0, :lens[b, 0]].tolist())) for b in range(batch)]


@pytest.mark.parametrize("seed,alpha", [(0, 0.0), (1, 0.6), (2, 2.0), (3, 0.0)])
def test_wide_beam_search_finds_the_brute_force_best(seed, alpha):
    eos = 3
    step, logprobs = toy(eos, seed)
    # 64 beams see every continuation of every live prefix up to the last step, where the best
    # finish of each length is among the best 64: exhaustive.
    (score, seq), = run_toy(step, 64, alpha, eos)
    best_score, best_seq = brute_force(logprobs, eos, alpha)
    assert seq == best_seq
    np.testing.assert_allclose(score, best_score, rtol=1e-5)


def reference_beam_search(logprobs, num_beams, steps, eos, alpha):
    """The same rules, in plain Python: 2K candidates, eos ones among the best K finish, exact
    early stop."""
    pen = lambda n: ((5 + n) / 6) ** alpha
    alive, finished = [((), 0.0)], []
    for i in range(steps):
        cands = sorted(((seq + (t,), lp + float(l)) for seq, lp in alive
                        for t, l in enumerate(logprobs(seq))), key=lambda c: -c[1])[:2 * num_beams]
        finished = sorted(finished + [(s, lp / pen(i + 1)) for s, lp in cands[:num_beams]
                                      if s[-1] == eos],
                          key=lambda c: -c[1])[:num_beams]
        alive = [c for c in cands if c[0][-1] != eos][:num_beams]
        bound = max(lp for _, lp in alive) / max(pen(i + 1), pen(steps))
        if len(finished) == num_beams and finished[-1][1] >= bound:
            return finished[0]
    return sorted(finished + [(s, lp / pen(steps)) for s, lp in alive], key=lambda c: -c[1])[0]


def test_narrow_beam_search_follows_the_reference_and_one_beam_is_greedy():
    for seed in range(4):
        eos = seed % V
        step, logprobs = toy(eos, seed, scale=1.0)
        for k, alpha in [(2, 0.0), (3, 0.6), (2, 1.5)]:
            (score, seq), = run_toy(step, k, alpha, eos)
            ref_seq, ref_score = reference_beam_search(logprobs, k, STEPS, eos, alpha)
            assert seq == ref_seq, (seed, k, alpha)
            np.testing.assert_allclose(score, ref_score, rtol=1e-5)
        greedy = jax.jit(lambda: bs.greedy_loop(step, jnp.zeros(1, jnp.int32), batch=1,
                                                steps=STEPS, start_id=START, eos_id=eos))()
        greedy = np.asarray(greedy)[0].tolist()
        greedy = greedy[:greedy.index(eos) + 1] if eos in greedy else greedy
        assert run_toy(step, 1, 0.0, eos)[0][1] == tuple(greedy)


def test_length_penalty_changes_the_choice():
    """Ending at once costs log 0.5; going on costs a little more in total but over more tokens:
    without a penalty the short output wins, with alpha 2 the long one."""
    eos = 3
    table = np.full((STEPS, V), -30.0, np.float32)
    table[0, [eos, 1]] = np.log(0.5)  # step 0: eos or token 1, even odds
    table[1:, 1] = np.log(0.95)  # then token 1 ...
    table[1:, eos] = np.log(0.05)  # ... or eos

    def step(tokens, i, cache):
        return jnp.asarray(table)[i][None].repeat(tokens.shape[0], 0), cache

    short = run_toy(step, 2, 0.0, eos)[0][1]
    long = run_toy(step, 2, 2.0, eos)[0][1]
    assert short == (eos,) and long == (1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# Search on the models.


def model_reference_beam(built, params, inputs, num_beams, steps_, eos, alpha):
    """The Python reference beam search over full forward passes (no cache), one input at a
    time."""
    graphdef = built.graphdef
    forward = jax.jit(lambda p, x, d: nnx.merge(graphdef, p)(x, decoder_tokens=d))
    out = []
    for x in inputs:
        enc = np.asarray([x], np.int32)

        def logprobs(prefix):
            dec = np.zeros((1, steps_ + 1), np.int32)  # causal: what follows changes nothing
            dec[0, :len(prefix) + 1] = (2,) + tuple(prefix)
            return np.asarray(jax.nn.log_softmax(forward(params, enc, dec)[0, len(prefix)]))

        out.append(reference_beam_search(logprobs, num_beams, steps_, eos, alpha))
    return out


def test_model_beam_search_matches_the_reference_and_beam_1_is_greedy(devices):
    built, params, _, _ = make("t5", noise=0.3)
    g = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
    rng = np.random.default_rng(3)
    inputs = [rng.integers(4, 64, n).tolist() for n in (5, 14, 3)]
    eos, steps_ = 10, 6  # a token this model does produce, so some beams end early
    beams = g.generate(params, inputs, max_new_tokens=steps_, start_id=2, eos_id=eos,
                       num_beams=3, length_penalty=0.6)
    reference = model_reference_beam(built, params, inputs, 3, steps_, eos, 0.6)
    for got, score, (seq, ref_score) in zip(beams.tokens, beams.scores, reference):
        assert got == list(seq[:-1] if seq[-1] == eos else seq)
        np.testing.assert_allclose(score, ref_score, rtol=1e-4)
    assert any(beams.stopped)
    # A batch decodes each input as it would alone (the encoder padding is never attended to).
    assert g.generate(params, inputs[1:2], max_new_tokens=steps_, start_id=2, eos_id=eos,
                      num_beams=3, length_penalty=0.6).tokens == beams.tokens[1:2]
    # One beam without a length penalty is greedy.
    greedy = g.generate(params, inputs, max_new_tokens=steps_, start_id=2, eos_id=eos)
    cache, segs = g._encode(params, *bs.layout_inputs(inputs), steps_, 1)
    seqs, lens, _ = g._beam(params, cache, segs, steps_, 1, 0.0, 2, eos)
    one = [[t for t in s[:n] if t != eos] for s, n in zip(np.asarray(seqs)[:, 0].tolist(),
                                                          np.asarray(lens)[:, 0].tolist())]
    assert one == greedy.tokens
    assert len({tuple(t) for t in greedy.tokens}) > 1 and any(len(set(t)) > 1 for t in greedy.tokens)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(devices):
    built, params, _, _ = make("t5", noise=0.3)
    g = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
    inputs = [[5, 6, 7, 8], [9, 10]]
    kw = dict(max_new_tokens=6, start_id=2, eos_id=3)
    greedy = g.generate(params, inputs, **kw)
    assert g.generate(params, inputs, sampling=bs.Sampling(1.5, top_k=1), seed=4, **kw).tokens \
        == greedy.tokens
    hot = bs.Sampling(temperature=3.0)
    a, b, c = (g.generate(params, inputs, sampling=hot, seed=s, **kw).tokens for s in (7, 7, 8))
    assert a == b and a != c


def test_bad_seq2seq_input(devices):
    built, params, _, _ = make("t5")
    g = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
    kw = dict(max_new_tokens=2, start_id=2, eos_id=3)
    with pytest.raises(ValueError, match="^input 1 is empty"):
        g.generate(params, [[4], []], **kw)
    with pytest.raises(ValueError, match="^input 0 has 33 tokens but the encoder's context is "
                                         "model.max_len=32"):
        g.generate(params, [[4] * 33], **kw)
    with pytest.raises(ValueError, match=r"^num_beams=0 must be an integer >= 1"):
        g.generate(params, [[4]], num_beams=0, **kw)
    with pytest.raises(ValueError, match="needs model.family='encoder_decoder'"):
        bs.Seq2SeqGenerator(make_encoder()[0].graphdef, make_encoder()[0].model_cfg)


# ------------------------------------------------------------------------------------------------
# Fill-mask.


@functools.lru_cache(maxsize=None)
def make_encoder():
    return make("bert", noise=0.3)[:2]


def test_fill_mask_top_1_is_the_forward_argmax(devices):
    built, params = make_encoder()
    mask = 4
    rows = [[2, 7, mask, 9, mask, 3], [2, mask, 11, 3]]
    out = fill_mask(built.graphdef, built.model_cfg, params, rows, mask_id=mask, top_k=5)
    assert [[c.position for c in r] for r in out] == [[2, 4], [1]]
    for row, cands in zip(rows, out):
        x = np.asarray([row], np.int32)
        logits = np.asarray(jax.jit(lambda p, x: nnx.merge(built.graphdef, p)(x))(params, x))[0]
        for c in cands:
            probs = np.exp(logits[c.position] - logits[c.position].max())
            probs /= probs.sum()
            assert c.ids[0] == int(logits[c.position].argmax())
            assert c.ids == np.argsort(-probs)[:5].tolist()
            np.testing.assert_allclose(c.probs, np.sort(probs)[::-1][:5], rtol=1e-4, atol=1e-6)
            assert sum(c.probs) <= 1 + 1e-6 and c.probs == sorted(c.probs, reverse=True)
    with pytest.raises(ValueError, match="^text 1 has no <mask>"):
        fill_mask(built.graphdef, built.model_cfg, params, [[2, mask, 3], [2, 5, 3]], mask_id=mask)


# ------------------------------------------------------------------------------------------------
# The command line on saved tiny runs (a checkpoint of the initial parameters + tokenizer.model).


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    from llmjax.checkpoint import Checkpointer
    from llmjax.data.objectives import reserved_pieces
    from llmjax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("seq2seq_runs")
    text = pathlib.Path(np.__file__).read_text()  # any offline English-and-code text
    runs = {}
    for style, objective in (("t5", "span_corruption"), ("bert", "mlm")):
        config = tiny_train_config(style, **{"data.objective": objective,
                                             "model.vocab_size": 512})
        built, params, _, _ = make(style, noise=0.3, vocab=512)
        workdir = root / style
        train_tokenizer([text] * 4, 512, workdir / "tokenizer.model",
                        reserved=reserved_pieces(config.data))
        state = {"step": 0, "params": params, "opt_state": {}}
        ckpt = Checkpointer(str(workdir), max_to_keep=1, async_save=False)
        ckpt.save(1, state, None, config.to_dict(), force=True)
        ckpt.close()
        runs[style] = workdir
    return runs


def cli(workdir, *args, stdin=None):
    repo = pathlib.Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "llmjax.generate", f"--workdir={workdir}", *args],
                          input=stdin, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_cli_encoder_decoder(saved_runs):
    run = saved_runs["t5"]
    kw = ["--config.sample.max_new_tokens=4", "--config.sample.temperature=0"]
    one = cli(run, "--prompt=import os", *kw)
    assert one.returncode == 0, one.stderr
    beams = cli(run, "--prompt=import os", "--config.sample.num_beams=3", *kw)
    assert beams.returncode == 0, beams.stderr
    assert len(one.stdout.splitlines()) <= 4 and len(beams.stdout.splitlines()) <= 4
    many = cli(run, *kw, stdin="import os\n\ndef f\n")
    assert many.returncode == 0, many.stderr
    assert many.stdout.startswith(one.stdout.rstrip("\n"))
    for args, message in (
            (["--prompt="], "error: the input is empty; give at least one character of text to "
                            "encode."),
            (["--prompt=" + " ".join(map(str, range(100)))], "error: input 0 has"),
            (["--prompt=x", "--config.sample.num_beams=0"], "error: sample.num_beams=0 must be")):
        bad = cli(run, *kw, *args)
        assert bad.returncode == 2 and bad.stderr.strip().startswith(message), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    bench = cli(run, "--benchmark")
    assert bench.returncode == 0, bench.stderr
    assert [line.split(":")[0] for line in bench.stdout.splitlines() if "tokens/s" in line] == [
        "seq2seq decode batch 1", "seq2seq decode batch 8"]


@pytest.mark.slow
def test_cli_fill_mask(saved_runs):
    run = saved_runs["bert"]
    one = cli(run, "--prompt=import <mask> as np<mask>", "--config.sample.top_k=3")
    assert one.returncode == 0, one.stderr
    lines = one.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["<mask> 1", "<mask> 2"]
    assert all(len(line.split(", ")) == 3 for line in lines)
    bad = cli(run, "--prompt=import numpy")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: text 0 has no <mask>")
    many = cli(run, "--config.sample.top_k=3", stdin="no mask here\nimport <mask>\n")
    assert many.returncode == 0
    assert many.stderr.strip().startswith("error: text 0 has no <mask>")
    assert many.stdout.startswith("<mask> 1:")
