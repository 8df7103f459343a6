"""Pretraining objectives: their statistics on thousands of rows match their definitions (BERT
masking, T5 span corruption, BART text infilling), the Grain pipeline's batches have the shapes
the model expects, and bad setups are one-line errors."""

import json
import math
import os
import sysconfig

import ml_collections
import numpy as np
import pytest

from llmjax import steps
from llmjax.config import base_config
from llmjax.data import objectives as obj
from llmjax.data import pipeline
from llmjax.data import tokenizer as tokenizer_lib

import family_helpers as fh

MASK, SENTINELS, EOS = 4, list(range(5, 105)), 3


def test_mlm_masks_15_percent_split_80_10_10():
    rng = np.random.default_rng(0)
    n_rows, t = 4000, 64
    chosen = masked = randomized = kept = eligible_total = 0
    for _ in range(n_rows):
        tokens = rng.integers(200, 1000, t)
        eligible = np.ones(t, bool)
        eligible[[0, -1]] = False  # bos/eos-like specials
        eligible[rng.integers(40, 64):] = False  # padding tail
        out = obj.mlm_mask(tokens, eligible, rng, mask_rate=0.15, mask_id=MASK, random_ids=(105, 1000))
        w = out["weights"].astype(bool)
        assert not (w & ~eligible).any()  # never a special or padding position
        assert w.sum() == max(1, round(0.15 * eligible.sum()))
        np.testing.assert_array_equal(out["targets"], tokens)
        np.testing.assert_array_equal(out["inputs"][~w], tokens[~w])  # unscored: untouched
        chosen += w.sum()
        eligible_total += eligible.sum()
        masked += (out["inputs"][w] == MASK).sum()
        kept += (out["inputs"][w] == tokens[w]).sum()
        randomized += ((out["inputs"][w] != MASK) & (out["inputs"][w] != tokens[w])).sum()
    assert abs(chosen / eligible_total - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    # A random replacement may draw the original token (1/895 of the time): it then counts as kept.
    assert abs(randomized / chosen - 0.1) < 0.01 and abs(kept / chosen - 0.1) < 0.01


def test_span_corruption_lengths_are_t5s():
    # T5's published setting: 512 inputs come from 568 raw tokens and give 114 targets.
    assert obj.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    # 141 raw tokens: 21 noise in 7 spans, 120 + 7 sentinels + eos = 128 inputs, 21 + 7 + 1 targets;
    # 142 would give 121 + 7 + 1 = 129 inputs.
    assert obj.span_corruption_lengths(128, 0.15, 3.0) == (141, 29)
    assert obj.span_corruption_lengths(512, 0.5, 3.0)[1] <= 512


def _reconstruct(inputs, targets):
    """The original row from T5's (inputs, targets): each input sentinel by its target span."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return np.asarray(out), spans


def test_span_corruption_statistics_and_sentinel_layout():
    rng = np.random.default_rng(0)
    tokens_length, targets_length = obj.span_corruption_lengths(128, 0.15, 3.0)
    span_lengths, noise = [], 0
    for _ in range(2000):
        tokens = rng.integers(200, 1000, tokens_length)
        inputs, targets = obj.span_corruption(tokens, rng, noise_density=0.15,
                                              mean_noise_span_length=3.0, sentinel_ids=SENTINELS,
                                              eos_id=EOS)
        assert len(inputs) == 128 and len(targets) == targets_length  # exactly filled
        assert inputs[-1] == EOS and targets[-1] == EOS
        n_spans = round(round(tokens_length * 0.15) / 3)
        # Sentinels appear in order 0, 1, 2... once each on both sides; targets start with one.
        assert [t for t in inputs if t in SENTINELS] == SENTINELS[:n_spans]
        assert [t for t in targets if t in SENTINELS] == SENTINELS[:n_spans]
        assert targets[0] == SENTINELS[0] and inputs[0] not in SENTINELS
        original, spans = _reconstruct(inputs, targets)
        np.testing.assert_array_equal(original, tokens)
        span_lengths += [len(s) for s in spans.values()]
        noise += sum(len(s) for s in spans.values())
    assert min(span_lengths) >= 1
    assert noise / (2000 * tokens_length) == pytest.approx(round(tokens_length * 0.15) / tokens_length)
    assert abs(np.mean(span_lengths) - 21 / 7) < 1e-9  # 21 noise tokens in 7 spans
    # Span lengths are a uniformly random composition of 21 into 7 parts: P(length=1) = C(19,5)/C(20,6).
    assert abs(np.mean(np.asarray(span_lengths) == 1) - math.comb(19, 5) / math.comb(20, 6)) < 0.02


def test_text_infilling_statistics():
    rng = np.random.default_rng(0)
    n, rows = 128, 3000
    lengths, inserted, masked_total = [], 0, 0
    for _ in range(rows):
        tokens = rng.integers(200, 1000, n)
        corrupted, is_masked = obj.text_infilling(tokens, rng, rate=0.3, poisson_lambda=3.0,
                                                  mask_id=MASK)
        assert is_masked.sum() == math.ceil(0.3 * n)
        masked_total += is_masked.sum()
        # Unmasked tokens survive in order; each masked run is one <mask>; the rest are insertions.
        np.testing.assert_array_equal(corrupted[corrupted != MASK], tokens[~is_masked])
        runs = np.diff(np.concatenate([[0], is_masked.astype(int), [0]]))
        starts, ends = np.flatnonzero(runs == 1), np.flatnonzero(runs == -1)
        lengths += list(ends - starts)
        inserted += (corrupted == MASK).sum() - len(starts)
    # Spans have zero-truncated Poisson(3) lengths (mean 3 / (1 - e^-3) = 3.157), the last one of
    # each row trimmed to fit; a length-0 draw (e^-3 = 5% of draws) inserts a mask instead.
    assert abs(np.mean(lengths) - 3 / (1 - math.exp(-3))) < 0.15
    draws = len(lengths) + inserted
    assert abs(inserted / draws - math.exp(-3)) < 0.01


def test_sentence_permutation_keeps_the_lines():
    rng = np.random.default_rng(0)
    tokens = np.arange(20)
    is_end = np.isin(tokens, [4, 9, 14])  # four lines: 0-4, 5-9, 10-14, 15-19
    orders = set()
    for _ in range(200):
        out = obj.permute_sentences(tokens, is_end, rng)
        lines = [tuple(out[i:i + 5]) for i in range(0, 20, 5)]
        assert sorted(lines) == [tuple(range(i, i + 5)) for i in range(0, 20, 5)]
        orders.add(tuple(lines))
    assert len(orders) == 24  # every order of four lines appears


# ---------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    """Twenty real Python files as a local text corpus."""
    root = tmp_path_factory.mktemp("src")
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("abc", "bisect", "colorsys", "copy", "fnmatch", "functools", "glob", "heapq",
                 "keyword", "linecache", "numbers", "opcode", "operator", "queue", "random",
                 "sched", "shlex", "string", "textwrap", "this"):
        with open(os.path.join(stdlib, name + ".py"), encoding="utf-8") as f:
            (root / f"{name}.txt").write_text(f.read())
    c = base_config().data
    c.update(name="text", files=f"{root}/*.txt", data_dir=str(tmp_path_factory.mktemp("tfds")),
             validation_fraction=0.1, num_sentinels=16, shuffle_tokens=4096)
    return c


@pytest.fixture(scope="module")
def reserved_tokenizer(corpus_cfg):
    from llmjax.data import corpus
    cfg = ml_collections.ConfigDict(corpus_cfg.to_dict())
    cfg.objective = "span_corruption"
    texts = corpus.load_split(cfg, "train")
    return tokenizer_lib.train_tokenizer([texts[i] for i in range(len(texts))], 512, None,
                                         max_chars=200_000,
                                         reserved=obj.reserved_pieces(cfg))


@pytest.mark.parametrize("objective,family", [("mlm", "bert"), ("mlm-static", "roberta"),
                                              ("span_corruption", "t5"),
                                              ("text_infilling", "bart")])
def test_pipeline_batches_fit_the_model(corpus_cfg, reserved_tokenizer, objective, family):
    data = ml_collections.ConfigDict(corpus_cfg.to_dict())
    data.objective = objective.split("-")[0]
    data.mask_dynamic = not objective.endswith("static")
    data.permute_sentences = 0.5
    config = fh.tiny_train_config(family, seq_len=32, batch_size=4)
    config.data = data
    shapes = steps.batch_shapes(config)
    tok = reserved_tokenizer
    it = pipeline.make_train_iterator(data, tok, seq_len=32, batch_size=4, seed=0,
                                      process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == shapes
        assert all(v.dtype == np.int32 for v in batch.values())
        dec_seg = batch.get("decoder_segment_ids", batch["segment_ids"])
        assert not (batch["weights"] & (dec_seg == 0)).any()  # nothing scored in padding
        if data.objective == "mlm":
            w = batch["weights"].astype(bool)
            assert 0.05 < w.mean() < 0.3
            assert (batch["inputs"][~w] == batch["targets"][~w]).all()
        else:  # teacher forcing: the decoder reads the targets shifted right
            np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:][dec_seg[:, 1:] != 0],
                                          batch["targets"][:, :-1][dec_seg[:, 1:] != 0])
        if data.objective == "span_corruption":
            assert np.isin(batch["inputs"], tok.sentinel_ids).any()
        if data.objective == "text_infilling":
            assert (batch["inputs"] == tok.mask_id).any()
    # The same arguments give the same batches; eval batches are fixed.
    again = pipeline.make_train_iterator(data, tok, seq_len=32, batch_size=4, seed=0,
                                         process_index=0, process_count=1)
    for a, b in zip(batches, [next(again) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Resuming from a saved (JSON round-tripped, as Orbax stores it) state continues exactly.
    state = json.loads(json.dumps(again.get_state()))
    want = [next(again) for _ in range(2)]
    resumed = pipeline.make_train_iterator(data, tok, seq_len=32, batch_size=4, seed=0,
                                           process_index=0, process_count=1)
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(2)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    ev = pipeline.make_eval_batches(data, tok, seq_len=32, batch_size=4, num_batches=2,
                                    process_index=0, process_count=1)
    assert {k: v.shape for k, v in ev[0].items()} == shapes


# ---------------------------------------------------------------------------------------------
# Bad input


def test_tokenizer_without_sentinels_is_one_line_error(corpus_cfg):
    plain = tokenizer_lib.train_tokenizer(["def f(x):\n    return x\n" * 50], 300, None)
    for name in ("mask_id", "sentinel_ids"):
        with pytest.raises(ValueError, match="no .*piece") as e:
            getattr(plain, name)
        assert "\n" not in str(e.value)
    data = ml_collections.ConfigDict(corpus_cfg.to_dict())
    data.objective = "span_corruption"
    with pytest.raises(ValueError, match="no <mask> piece"):
        obj.check_setup(data, plain, 64)


def test_sequence_too_short_is_one_line_error(corpus_cfg, reserved_tokenizer):
    data = ml_collections.ConfigDict(corpus_cfg.to_dict())
    for objective, seq_len, message in (("span_corruption", 3, "too short for span corruption"),
                                        ("mlm", 4, "too short for masked LM"),
                                        ("text_infilling", 5, "too short for text infilling")):
        data.objective = objective
        with pytest.raises(ValueError, match=message) as e:
            obj.check_setup(data, reserved_tokenizer, seq_len)
        assert "\n" not in str(e.value)
    data.objective = "span_corruption"
    with pytest.raises(ValueError, match="sentinel ids but the tokenizer has 16"):
        obj.check_setup(data, reserved_tokenizer, 512)  # 28 spans, 16 sentinels
    data.objective = "denoise"
    with pytest.raises(ValueError, match="data.objective='denoise' is not one of"):
        obj.check_setup(data, reserved_tokenizer, 64)
