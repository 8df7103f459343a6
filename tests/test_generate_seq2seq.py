"""Encoder-decoder decoding (cache, greedy, beam search), fill-mask and their command line."""

import functools
import itertools
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import beam_search as bs
from llmjax import sharding, steps
from llmjax.fill_mask import fill_mask
from llmjax.models import ModelConfig
from tests.family_helpers import tiny_train_config


@functools.lru_cache(maxsize=None)
def make(style, mesh_shape=(1, 1, 1)):
    """(built, params, mesh, rules) of a tiny model (vocabulary 512, the CLI tokenizer's), shared
    by the tests; `built` has the graphdef and model_cfg. The parameters are N(0, 0.3) (norm scales
    1 + N(0, 0.3)), the same values on every mesh, drawn without compiling an init: the usual
    small init gives nearly flat logits (the same token every step)."""
    config = tiny_train_config(style, **{"model.vocab_size": 512})
    model_cfg = ModelConfig.from_config(config.model)
    graphdef, abstract = steps.abstract_model(model_cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map_with_path(
        lambda path, a: (rng.normal(0, 0.3, a.shape) + (path[-1].key == "scale"))
        .astype(np.float32), nnx.to_pure_dict(abstract))
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    rules = sharding.rules_from_config(config.sharding_rules)
    with nnx.logical_axis_rules(rules):
        params = jax.device_put(params, sharding.param_shardings(abstract, mesh, rules))
    return types.SimpleNamespace(graphdef=graphdef, model_cfg=model_cfg), params, mesh, rules


def encoder_batch(rng, lengths, width=12):
    tokens = rng.integers(4, 512, (len(lengths), width)).astype(np.int32)
    segments = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    tokens *= segments
    positions = np.where(segments != 0, np.arange(width), 0).astype(np.int32)
    return tokens, segments, positions


def cached_logits(built, params, tokens, segments, positions, decoder, prefill):
    """The cache's logits: `prefill` decoder tokens at once, then one per step."""
    graphdef = built.graphdef

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
    return np.asarray(jnp.concatenate(outs, axis=1)), cache


# Shared by the cache and search tests on the 1-device and 8-device meshes (one compilation).
INPUTS = [np.random.default_rng(3).integers(4, 512, n).tolist() for n in (5, 14, 3, 9)]
BEAM = dict(max_new_tokens=6, start_id=2, eos_id=362, num_beams=3, length_penalty=0.6)


@pytest.mark.parametrize("style", ["t5", "t5_v1_1", "bart"])
def test_cache_gives_the_full_forward_logits_on_1_and_8_devices(devices, style):
    """Padded encoder inputs of different lengths; 18 decoder tokens, past T5's 8 exact relative
    buckets (of 16 causal ones), so its log-spaced buckets are checked too."""
    rng = np.random.default_rng(0)
    tokens, segments, positions = encoder_batch(rng, [12, 7, 3, 9])
    decoder = rng.integers(4, 512, (4, 18)).astype(np.int32)
    built, params, _, _ = make(style)
    full = np.asarray(jax.jit(lambda p, *a: nnx.merge(built.graphdef, p)(*a[:3], decoder_tokens=a[3]))(
        params, tokens, segments, positions, decoder))
    cached, _ = cached_logits(built, params, tokens, segments, positions, decoder, 3)
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
    built8, params8, mesh, rules = make(style, (2, 2, 2))
    assert params8["encoder"]["layers"]["attn"]["query"]["kernel"].sharding.spec != \
        jax.sharding.PartitionSpec()
    with sharding.use_mesh(mesh, rules):
        cached8, cache8 = cached_logits(built8, params8, tokens, segments, positions, decoder, 1)
        if style == "t5":  # the generator's sharded caches, beams included, as on one device
            g8 = bs.Seq2SeqGenerator(built8.graphdef, built8.model_cfg)
            greedy8 = g8.generate(params8, INPUTS, **dict(BEAM, num_beams=1))
            beams8 = g8.generate(params8, INPUTS, **BEAM)
    # The caches are sharded like activations: batch over (data, fsdp), heads over tensor.
    for name in ("k", "v", "cross_k", "cross_v"):
        spec = cache8[name].sharding.spec
        assert tuple(spec[1]) == ("data", "fsdp") and spec[3] == "tensor", (name, spec)
    # Sharded reductions add in another order: float32 rounding of logits of size ~3.
    np.testing.assert_allclose(cached8, full, atol=5e-4, rtol=1e-4)
    if style == "t5":
        g1 = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
        assert greedy8.tokens == g1.generate(params, INPUTS, **dict(BEAM, num_beams=1)).tokens
        assert beams8.tokens == g1.generate(params, INPUTS, **BEAM).tokens


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
    time (padded to one width, so the forward pass compiles once)."""
    forward = jax.jit(lambda p, x, s, d: nnx.merge(built.graphdef, p)(x, s, decoder_tokens=d))
    out = []
    for x in inputs:
        enc, seg = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
        enc[0, :len(x)], seg[0, :len(x)] = x, 1

        def logprobs(prefix):
            dec = np.zeros((1, steps_ + 1), np.int32)  # causal: what follows changes nothing
            dec[0, :len(prefix) + 1] = (2,) + tuple(prefix)
            return np.asarray(jax.nn.log_softmax(forward(params, enc, seg, dec)[0, len(prefix)]))

        out.append(reference_beam_search(logprobs, num_beams, steps_, eos, alpha))
    return out


def test_model_beam_search_matches_the_reference_and_beam_1_is_greedy(devices):
    built, params, _, _ = make("t5")
    g = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
    beams = g.generate(params, INPUTS, **BEAM)
    reference = model_reference_beam(built, params, INPUTS, BEAM["num_beams"],
                                     BEAM["max_new_tokens"], BEAM["eos_id"],
                                     BEAM["length_penalty"])
    for got, score, (seq, ref_score) in zip(beams.tokens, beams.scores, reference):
        assert got == list(seq[:-1] if seq[-1] == BEAM["eos_id"] else seq)
        np.testing.assert_allclose(score, ref_score, rtol=1e-4)
    assert any(beams.stopped) and not all(beams.stopped)  # eos is a token this model produces
    # One beam without a length penalty is greedy.
    greedy = g.generate(params, INPUTS, **dict(BEAM, num_beams=1))
    cache, segs = g._encode(params, *bs.layout_inputs(INPUTS), BEAM["max_new_tokens"], 1)
    seqs, lens, _ = g._beam(params, cache, segs, BEAM["max_new_tokens"], 1, 0.0, 2,
                            BEAM["eos_id"])
    one = [[t for t in s[:n] if t != BEAM["eos_id"]]
           for s, n in zip(np.asarray(seqs)[:, 0].tolist(), np.asarray(lens)[:, 0].tolist())]
    assert one == greedy.tokens
    assert len({tuple(t) for t in greedy.tokens}) > 1 and any(len(set(t)) > 1 for t in greedy.tokens)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(devices):
    built, params, _, _ = make("t5")
    g = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
    kw = dict(BEAM, num_beams=1)
    greedy = g.generate(params, INPUTS, **kw)
    assert g.generate(params, INPUTS, sampling=bs.Sampling(1.5, top_k=1), seed=4, **kw).tokens \
        == greedy.tokens
    hot = bs.Sampling(temperature=3.0)
    a, b, c = (g.generate(params, INPUTS, sampling=hot, seed=s, **kw).tokens for s in (7, 7, 8))
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
        bs.Seq2SeqGenerator(make("bert")[0].graphdef, make("bert")[0].model_cfg)
    from llmjax.validate import validate_config
    for key, value, message in (("num_beams", 0, "sample.num_beams=0 must be an integer >= 1"),
                                ("length_penalty", float("nan"),
                                 "sample.length_penalty=nan must be a finite number")):
        config = tiny_train_config("t5", **{f"sample.{key}": value})
        with pytest.raises(ValueError, match=f"^{message}") as e:
            validate_config(config)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Fill-mask.


def test_fill_mask_top_1_is_the_forward_argmax(devices):
    built, params, _, _ = make("bert")
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
    import shutil

    from llmjax.checkpoint import Checkpointer
    from llmjax.data.objectives import reserved_pieces
    from llmjax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("seq2seq_runs")
    text = pathlib.Path(np.__file__).read_text()  # any offline English-and-code text
    runs = {}
    for style, objective in (("t5", "span_corruption"), ("bert", "mlm")):
        config = tiny_train_config(style, **{"data.objective": objective,
                                             "model.vocab_size": 512})
        workdir = root / style
        if not runs:  # both objectives reserve the same pieces (<mask> and 8 sentinels)
            train_tokenizer([text] * 4, 512, workdir / "tokenizer.model",
                            reserved=reserved_pieces(config.data))
        else:
            workdir.mkdir()
            shutil.copy(root / "t5" / "tokenizer.model", workdir / "tokenizer.model")
        state = {"step": 0, "params": make(style)[1], "opt_state": {}}
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


def one_line_error(result, start):
    assert result.returncode == 2 and result.stderr.strip().startswith(start), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_encoder_decoder(saved_runs):
    run = saved_runs["t5"]
    kw = ["--config.sample.max_new_tokens=4", "--config.sample.temperature=0"]
    # Interactive: a line per input; a blank line is skipped; a bad one does not end the session.
    too_long = " ".join(map(str, range(100)))
    many = cli(run, *kw, stdin=f"import os\n\n{too_long}\ndef f\n")
    assert many.returncode == 0, many.stderr
    assert many.stderr.strip().startswith("error: input 0 has") and "model.max_len=32" in many.stderr
    beams = cli(run, "--prompt=import os", "--config.sample.num_beams=3", *kw)
    assert beams.returncode == 0, beams.stderr
    one_line_error(cli(run, "--prompt=", *kw),
                   "error: the input is empty; give at least one character of text to encode.")
    one_line_error(cli(run, "--prompt=x", "--config.sample.num_beams=0"),
                   "error: sample.num_beams=0 must be an integer >= 1")
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
    many = cli(run, "--config.sample.top_k=3", stdin="no mask here\nimport <mask> as np<mask>\n")
    assert many.returncode == 0 and many.stdout.splitlines() == lines
    assert many.stderr.strip() == ("error: text 0 has no <mask>; put <mask> where a token should "
                                   "be predicted, e.g. 'import <mask>'.")
    one_line_error(cli(run, "--prompt=import numpy"), "error: text 0 has no <mask>")


def test_end_of_run_sample_for_each_family(saved_runs):
    """train.py's closing sample (generate.sample_text): an encoder-decoder decodes sample.prompt,
    an encoder fills a <mask> appended to it."""
    from llmjax.config import base_config
    from llmjax.data.tokenizer import Tokenizer
    from llmjax.generate import sample_text
    tokenizer = Tokenizer.load(saved_runs["t5"] / "tokenizer.model")
    sample = base_config().sample
    sample.update(max_new_tokens=5, temperature=0.0, top_k=3)
    built, params, _, _ = make("t5")
    text, = sample_text(built.graphdef, built.model_cfg, params, tokenizer, sample,
                        data_cfg={"objective": "span_corruption"})
    gen = bs.Seq2SeqGenerator(built.graphdef, built.model_cfg)
    ids = gen.generate(params, [tokenizer.encode("def") + [tokenizer.eos_id]], max_new_tokens=5,
                       start_id=tokenizer.bos_id, eos_id=tokenizer.eos_id).tokens[0]
    assert text == tokenizer.decode(ids)
    built, params, _, _ = make("bert")
    lines, = sample_text(built.graphdef, built.model_cfg, params, tokenizer, sample)
    assert lines.startswith("<mask> 1: ") and len(lines.split(", ")) == 3


def test_sentinels_at_the_top_are_read_and_written_by_name(saved_runs):
    """A converted T5 (data.sentinels_at_top): <extra_id_N> in the text is id vocab + count - 1 - N,
    and such ids decode back to their names; the decoder then starts from pad."""
    from llmjax.data.objectives import decoder_start_id
    from llmjax.data.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(saved_runs["t5"] / "tokenizer.model")
    data = {"objective": "span_corruption", "sentinels_at_top": True, "num_sentinels": 3}
    top = tokenizer.vocab_size + 2
    ids = bs.encode_input(tokenizer, "x = <extra_id_0> + <extra_id_2>", data)
    assert ids == tokenizer.encode("x = ") + [top] + tokenizer.encode(" + ") + [top - 2,
                                                                                tokenizer.eos_id]
    assert bs.decode_output(tokenizer, ids[:-1], data) == "x = <extra_id_0> + <extra_id_2>"
    assert decoder_start_id(data, tokenizer) == tokenizer.pad_id
    with pytest.raises(ValueError, match="^<extra_id_3> is past the model's 3 sentinels"):
        bs.encode_input(tokenizer, "<extra_id_3>", data)
    # The run's own tokenizer holds the sentinels as pieces: the text goes through it unchanged.
    own = {"objective": "span_corruption"}
    assert bs.encode_input(tokenizer, "x <extra_id_0>", own) == tokenizer.encode(
        "x <extra_id_0>") + [tokenizer.eos_id]
    assert tokenizer.encode("<extra_id_0>") == [tokenizer.sentinel_ids[0]]


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_greedy_and_beam_search_match_transformers_generate(name, tmp_path):
    """A random tiny Hugging Face model, imported: greedy decoding and beam search (3 beams,
    length_penalty 0, where Hugging Face's len**alpha and GNMT's penalty agree and both stop when
    no live beam can win) give transformers' `generate` tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llmjax.interop import hf
    torch.manual_seed(0)
    if name == "t5":
        # Equal depths: transformers' generate sizes its decoder cache by num_layers.
        config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                       num_heads=4,
                                       relative_attention_num_buckets=8,
                                       relative_attention_max_distance=20)
        model = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.BartConfig(
            vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
            decoder_ffn_dim=48, max_position_embeddings=40, forced_bos_token_id=None,
            forced_eos_token_id=None)
        model = transformers.BartForConditionalGeneration(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # BART's LayerNorm biases dominate at 0.5
            p.add_((0.1 if name == "bart" and "norm" in pname else 0.5) * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path)
    ours, _ = hf.load(tmp_path)
    graphdef, state = nnx.split(ours)
    params = nnx.to_pure_dict(state)
    g = bs.Seq2SeqGenerator(graphdef, ours.cfg)
    rng = np.random.default_rng(5)
    inputs = [rng.integers(3, 96, n).tolist() for n in (7, 12, 4)]
    ids = np.full((3, 12), 0 if name == "t5" else 1)
    mask = np.zeros((3, 12), np.int64)
    for row, x in enumerate(inputs):
        ids[row, :len(x)], mask[row, :len(x)] = x, 1
    # The published conventions: T5 starts from pad (0) and ends at 1; BART starts from eos (2).
    start, eos, pad = (0, 1, 0) if name == "t5" else (2, 2, 1)
    steps_ = 8
    for beams in (1, 3):
        with torch.no_grad():
            ref = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                 max_new_tokens=steps_, do_sample=False, num_beams=beams,
                                 length_penalty=0.0, early_stopping=False,
                                 decoder_start_token_id=start, eos_token_id=eos,
                                 pad_token_id=pad).numpy()[:, 1:].tolist()
        ref = [r[:r.index(eos)] if eos in r else r for r in ref]
        got = g.generate(params, inputs, max_new_tokens=steps_, start_id=start, eos_id=eos,
                         num_beams=beams, length_penalty=0.0).tokens
        assert got == ref, (beams, got, ref)
