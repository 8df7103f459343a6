"""Encoder-decoder generation (T5, BART): the encoder runs once, the decoder decodes over a cache.

    gen = Seq2SeqGenerator(graphdef, model_cfg)
    out = gen.generate(params, inputs, max_new_tokens=32, start_id=bos, eos_id=eos)         # greedy
    out = gen.generate(params, inputs, ..., sampling=Sampling(temperature=0.7, top_k=40), seed=1)
    out = gen.generate(params, inputs, ..., num_beams=4, length_penalty=0.6)           # beam search

The inputs (encoder token ids, of different lengths) are right-padded to one [batch, S] array with
segment id 0 on the padding, which no query attends to. One jitted call encodes them and builds the
decoder cache: empty self-attention keys and values for `max_new_tokens` columns and every layer's
cross-attention keys and values of the encoder output, computed once (`EncoderDecoder.init_cache`).
A second jitted call runs a `lax.while_loop` that feeds one decoder token per step, starting from
`start_id` at position 0.

Greedy and sampling choose each token with `generate.choose` (the decoder's rules and seed
handling). Beam search keeps `num_beams` hypotheses per input (T5X's `decoding.beam_search` in
outline): each step expands every live beam by every token, keeps the 2 * num_beams best
continuations (so num_beams of them are not eos), moves those among the best num_beams that end in
eos to the finished set (fairseq's rule) and keeps the num_beams best others alive; the cache rows
follow their beams. A finished hypothesis of
n tokens (eos included) scores

    logprob_sum / ((5 + n) / 6) ** length_penalty        (GNMT's brevity penalty, as T5X)

so length_penalty 0 ranks by total log-probability and larger values favour longer outputs. A
row stops once its worst finished score beats the best score any live beam could still reach (its
log-probability only falls; the penalty is largest at max_new_tokens), so stopping early never
changes the result; the loop ends when every row has stopped. Beams still live after
max_new_tokens count as finished at that length. With num_beams=1 and length_penalty=0 this is
greedy decoding exactly (a length penalty may make a single beam prefer a later eos, which is
what it asks for; the command line decodes num_beams=1 greedily or by sampling).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.generate import Compiled, Output, Sampling, choose


def length_penalty(length, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016), as in T5X."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def layout_inputs(inputs: Sequence[Sequence[int]], *, bucket: int = 16):
    """Encoder inputs of different lengths -> right-padded (tokens, segment_ids, positions)
    [batch, S], S the longest rounded up to `bucket` (fewer recompilations)."""
    width = int(-(-max(len(x) for x in inputs) // bucket) * bucket)
    tokens = np.zeros((len(inputs), width), np.int32)
    segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
    for row, x in enumerate(inputs):
        tokens[row, :len(x)] = x
        segments[row, :len(x)] = 1
        positions[row, :len(x)] = np.arange(len(x))
    return tokens, segments, positions


@dataclasses.dataclass
class BeamOutput(Output):
    scores: list[float]  # the chosen hypothesis's length-penalised log-probability


# ------------------------------------------------------------------------------------------------
# Search, independent of the model: `step(tokens [n], i, cache) -> (logits [n, vocab], cache)`
# feeds the token at decoder position i; `reorder(cache, rows [n])` picks cache rows.


def greedy_loop(step: Callable, cache, *, batch: int, steps: int, start_id: int, eos_id: int,
                sampling: Sampling = Sampling(), key=None) -> jax.Array:
    """[batch, steps] tokens, eos-padded after each row's eos; stops when every row has one."""
    key = jax.random.key(0) if key is None else key

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < steps) & ~done.all()

    def body(carry):
        i, cache, last, done, out = carry
        logits, cache = step(last, i, cache)
        token = jnp.where(done, eos_id, choose(logits, jax.random.fold_in(key, i), sampling))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, cache, token, done | (token == eos_id), out

    out = jnp.full((batch, steps), eos_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), cache, jnp.full((batch,), start_id, jnp.int32),
             jnp.zeros(batch, bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def beam_loop(step: Callable, reorder: Callable, cache, *, batch: int, num_beams: int, steps: int,
              start_id: int, eos_id: int, alpha: float):
    """Beam search (see the module docstring). The cache has batch * num_beams rows, beam-major
    within each input (row b * num_beams + k). Returns (tokens [batch, num_beams, steps] with the
    finished hypotheses best first, their lengths (eos included) and scores [batch, num_beams])."""
    K = num_beams
    neg = jnp.float32(-jnp.inf)
    rows = jnp.arange(batch)[:, None]

    def bound(alive_lp, i):
        # The best score a live beam (i tokens so far) can still reach: its log-probability (<= 0)
        # only falls, over the largest penalty it could finish with.
        return alive_lp.max(-1) / jnp.maximum(length_penalty(i + 1, alpha),
                                              length_penalty(steps, alpha))

    def cond(c):
        i, done = c[0], c[-1]
        return (i < steps) & ~done.all()

    def body(c):
        i, cache, alive_seq, alive_lp, fin_seq, fin_len, fin_score, _ = c
        last = jax.lax.dynamic_index_in_dim(alive_seq, i, 2, keepdims=False).reshape(-1)
        logits, cache = step(last, i, cache)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, K, vocab)
        cand_lp, flat = jax.lax.top_k((alive_lp[:, :, None] + logp).reshape(batch, K * vocab),
                                      2 * K)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_seq = jax.lax.dynamic_update_slice(
            alive_seq[rows, beam], token[:, :, None], (0, 0, i + 1))  # [batch, 2K, steps + 1]
        is_eos = token == eos_id
        # The live beams: the best continuations that are not eos.
        alive_lp, pick = jax.lax.top_k(jnp.where(is_eos, neg, cand_lp), K)
        alive_seq = cand_seq[rows, pick]
        cache = reorder(cache, (rows * K + beam[rows, pick]).reshape(-1))
        # The finished set takes the eos continuations among the best K (fairseq's rule: with one
        # beam an eos finishes only when it is the best token, as in greedy decoding); the old set
        # goes first, so that on a tie the earlier (shorter) hypothesis stays.
        new_score = jnp.where(is_eos & (jnp.arange(2 * K) < K),
                              cand_lp / length_penalty(i + 1, alpha), neg)
        fin_score, pick = jax.lax.top_k(jnp.concatenate([fin_score, new_score], 1), K)
        fin_seq = jnp.concatenate([fin_seq, cand_seq], 1)[rows, pick]
        fin_len = jnp.concatenate([fin_len, jnp.full((batch, 2 * K), i + 1)], 1)[rows, pick]
        done = fin_score[:, -1] >= bound(alive_lp, i + 1)
        return i + 1, cache, alive_seq, alive_lp, fin_seq, fin_len, fin_score, done

    # Column 0 holds the start token; column i + 1 the token chosen at step i. At first all beams
    # are the same sequence, so only beam 0 is live (the others start at -inf).
    alive_seq = jnp.zeros((batch, K, steps + 1), jnp.int32).at[:, :, 0].set(start_id)
    alive_lp = jnp.where(jnp.arange(K) == 0, 0.0, neg) * jnp.ones((batch, 1))
    fin_seq = jnp.zeros_like(alive_seq)
    fin_len = jnp.zeros((batch, K), jnp.int32)
    fin_score = jnp.full((batch, K), neg)
    carry = (jnp.zeros((), jnp.int32), cache, alive_seq, alive_lp, fin_seq, fin_len, fin_score,
             jnp.zeros(batch, bool))
    i, _, alive_seq, alive_lp, fin_seq, fin_len, fin_score, _ = jax.lax.while_loop(cond, body, carry)
    # Beams still live at max_new_tokens finish there (only when the loop ran out of steps).
    live = jnp.where(i == steps, alive_lp / length_penalty(steps, alpha), neg)
    fin_score, pick = jax.lax.top_k(jnp.concatenate([fin_score, live], 1), K)
    fin_seq = jnp.concatenate([fin_seq, alive_seq], 1)[rows, pick][:, :, 1:]
    fin_len = jnp.concatenate([fin_len, jnp.full((batch, K), steps)], 1)[rows, pick]
    return fin_seq, fin_len, fin_score


# ------------------------------------------------------------------------------------------------
# The model side.


def _reorder(cache: dict, rows: jax.Array) -> dict:
    """Cache rows follow their beams. The cross-attention keys and values are the same for every
    beam of an input (and beams never move across inputs), so they stay as they are."""
    from llmjax.models.layers import STACKED_CACHE_AXES
    from llmjax.sharding import constrain
    return dict(cache, k=constrain(cache["k"][:, rows], STACKED_CACHE_AXES),
                v=constrain(cache["v"][:, rows], STACKED_CACHE_AXES),
                valid=cache["valid"][rows], positions=cache["positions"][rows])


class Seq2SeqGenerator(Compiled):
    """Compiled encode-and-cache and decode loops for one encoder-decoder model (sharded under a
    mesh as `generate.Compiled` says)."""

    def __init__(self, graphdef, model_cfg, *, mesh=None, rules=None):
        if model_cfg.family != "encoder_decoder":
            raise ValueError(f"Seq2SeqGenerator needs model.family='encoder_decoder', not "
                             f"{model_cfg.family!r}.")
        super().__init__(graphdef, model_cfg, mesh=mesh, rules=rules)

    @functools.partial(jax.jit, static_argnums=(0, 5, 6))
    def _encode(self, params, tokens, segments, positions, length, num_beams):
        """Encoder output -> the decoder cache of `length` columns, each input repeated for its
        beams; and the matching encoder segment ids (the cross-attention mask)."""
        model = nnx.merge(self.graphdef, params)
        encoded = model.encode(tokens, segments, positions)
        if num_beams > 1:
            encoded = jnp.repeat(encoded, num_beams, axis=0)
            segments = jnp.repeat(segments, num_beams, axis=0)
        return model.init_cache(encoded, length), segments

    def _step(self, model, segments):
        def step(tokens, i, cache):
            n = tokens.shape[0]
            logits, cache = model.decode(tokens[:, None], None, segments,
                                         decoder_positions=jnp.full((n, 1), i, jnp.int32),
                                         cache=cache)
            return logits[:, 0], cache
        return step

    @functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
    def _greedy(self, params, cache, segments, key, steps, sampling, start_id, eos_id):
        model = nnx.merge(self.graphdef, params)
        return greedy_loop(self._step(model, segments), cache, batch=segments.shape[0],
                           steps=steps, start_id=start_id, eos_id=eos_id, sampling=sampling,
                           key=key)

    @functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
    def _beam(self, params, cache, segments, steps, num_beams, alpha, start_id, eos_id):
        model = nnx.merge(self.graphdef, params)
        return beam_loop(self._step(model, segments), _reorder, cache,
                         batch=segments.shape[0] // num_beams, num_beams=num_beams, steps=steps,
                         start_id=start_id, eos_id=eos_id, alpha=alpha)

    def check(self, inputs, max_new_tokens: int, num_beams: int) -> int:
        """Validates the inputs; returns the number of decoder steps that fit the context."""
        if not len(inputs):
            raise ValueError("no inputs given; pass at least one input.")
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1 (1: greedy or "
                             "sampling).")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1 (on the command line "
                             "--config.sample.max_new_tokens=N).")
        for i, x in enumerate(inputs):
            if len(x) == 0:
                raise ValueError(f"input {i} is empty; give at least one token of text to encode.")
            if len(x) > self.cfg.max_len:
                raise ValueError(f"input {i} has {len(x)} tokens but the encoder's context is "
                                 f"model.max_len={self.cfg.max_len} tokens; shorten the input.")
            if max(x) >= self.cfg.vocab_size or min(x) < 0:
                raise ValueError(f"input {i} has token ids outside [0, {self.cfg.vocab_size}); "
                                 "use the run's own tokenizer.")
        if max_new_tokens > self.cfg.max_len:
            logging.warning("max_new_tokens=%d cut to model.max_len=%d.", max_new_tokens,
                            self.cfg.max_len)
        return min(max_new_tokens, self.cfg.max_len)

    def generate(self, params, inputs: Sequence[Sequence[int]], *, max_new_tokens: int,
                 start_id: int, eos_id: int, sampling: Sampling = Sampling(), seed: int = 0,
                 num_beams: int = 1, length_penalty: float = 0.0) -> Output:
        """Decoded tokens per input up to (not including) eos. num_beams > 1: beam search (the
        sampling settings are then unused), returning a BeamOutput with the scores."""
        steps = self.check(inputs, max_new_tokens, num_beams)
        tokens, segments, positions = layout_inputs(inputs)
        with self._context():
            cache, segs = self._encode(params, tokens, segments, positions, steps, num_beams)
            if num_beams == 1:
                out = self._greedy(params, cache, segs, jax.random.key(seed), steps, sampling,
                                   int(start_id), int(eos_id))
                rows = np.asarray(jax.device_get(out)).tolist()
                lengths = [r.index(eos_id) + 1 if eos_id in r else steps for r in rows]
                scores = None
            else:
                seqs, lens, score = self._beam(params, cache, segs, steps, num_beams,
                                               float(length_penalty), int(start_id), int(eos_id))
                seqs, lens, score = jax.device_get((seqs[:, 0], lens[:, 0], score[:, 0]))
                rows, lengths = np.asarray(seqs).tolist(), np.asarray(lens).tolist()
                scores = np.asarray(score).tolist()
        tokens_out, stopped = [], []
        for row, n in zip(rows, lengths):
            ended = n >= 1 and row[n - 1] == eos_id
            tokens_out.append(row[:n - 1] if ended else row[:n])
            stopped.append(ended)
        if scores is None:
            return Output(tokens_out, stopped)
        return BeamOutput(tokens_out, stopped, scores)


# ------------------------------------------------------------------------------------------------
# Text in, text out.


_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def _top_sentinels(data_cfg, tokenizer) -> list[int] | None:
    """With data.sentinels_at_top (a converted T5) the sentinels are ids past the tokenizer's
    pieces, which it can neither write nor read: they are handled here by name."""
    from llmjax.data.objectives import sentinel_ids
    return sentinel_ids(data_cfg, tokenizer) if data_cfg.get("sentinels_at_top", False) else None


def encode_input(tokenizer, text: str, data_cfg) -> list[int]:
    """An encoder input as the model saw them in pretraining (`data_cfg`, the run's data
    section): pieces + [eos], after a bos unless the objective is T5's span corruption
    (objectives.py); `<extra_id_N>` in the text is sentinel N."""
    if not text:
        raise ValueError("the input is empty; give at least one character of text to encode.")
    top = _top_sentinels(data_cfg, tokenizer)
    ids = []
    for n, part in enumerate(_SENTINEL.split(text) if top else [text]):
        if n % 2 == 0:
            ids += tokenizer.encode(part) if part else []
        elif int(part) < len(top):
            ids.append(top[int(part)])
        else:
            raise ValueError(f"<extra_id_{part}> is past the model's {len(top)} sentinels "
                             f"(data.num_sentinels); use <extra_id_0> to <extra_id_{len(top) - 1}>.")
    from llmjax.data.objectives import encoder_start_ids
    return encoder_start_ids(data_cfg, tokenizer) + ids + [tokenizer.eos_id]


def decode_output(tokenizer, ids: Sequence[int], data_cfg) -> str:
    """Text of decoded ids; sentinels past the tokenizer's pieces are written <extra_id_N>."""
    top = _top_sentinels(data_cfg, tokenizer)
    if not top:
        return tokenizer.decode(ids)
    names = {t: f"<extra_id_{n}>" for n, t in enumerate(top)}
    out, run = [], []
    for t in list(ids) + [None]:
        if t is None or t in names:
            out.append(tokenizer.decode(run) if run else "")
            out.append(names.get(t, ""))
            run = []
        else:
            run.append(t)
    return "".join(out)


def seq2seq_text(graphdef, model_cfg, params, tokenizer, sample_cfg, inputs, *, data_cfg,
                 mesh=None, rules=None) -> list[str]:
    """The decoded target of each input text with the config's sample settings (num_beams > 1:
    beam search with sample.length_penalty; else temperature / top_k / top_p sampling, 0: greedy).
    The decoder starts as in training (bos, or pad for T5's conventions) and stops at eos."""
    from llmjax.data.objectives import decoder_start_id
    gen = Seq2SeqGenerator(graphdef, model_cfg, mesh=mesh, rules=rules)
    sampling = Sampling(float(sample_cfg.temperature), int(sample_cfg.top_k),
                        float(sample_cfg.get("top_p", 1.0)))
    ids = [encode_input(tokenizer, t, data_cfg) for t in inputs]
    out = gen.generate(params, ids, max_new_tokens=int(sample_cfg.max_new_tokens),
                       start_id=decoder_start_id(data_cfg, tokenizer), eos_id=tokenizer.eos_id,
                       sampling=sampling, seed=int(sample_cfg.get("seed", 0)),
                       num_beams=sample_cfg.get("num_beams", 1),
                       length_penalty=float(sample_cfg.get("length_penalty", 0.0)))
    return [decode_output(tokenizer, t, data_cfg) for t in out.tokens]


# ------------------------------------------------------------------------------------------------
# Decode benchmark.


def benchmark(run, *, batch_sizes=(1, 8), input_len: int = 64, new_tokens: int = 32,
              repeats: int = 3) -> list[dict]:
    """Encode + cache latency, per-token latency and tokens/s of greedy encoder-decoder decoding
    with no early stop (eos -1 never comes), for a `generate.Run`."""
    from llmjax.generate import speed, time_phases
    cfg = run.model_cfg
    gen = Seq2SeqGenerator(run.graphdef, cfg, mesh=run.mesh, rules=run.rules)
    input_len, new_tokens = min(input_len, cfg.max_len), min(new_tokens, cfg.max_len)
    rng = np.random.default_rng(0)
    results = []
    for batch in batch_sizes:
        tokens, segments, positions = layout_inputs(
            rng.integers(1, cfg.vocab_size, (batch, input_len)).tolist(), bucket=1)
        key = jax.random.key(0)
        with gen._context():
            encode, decode = time_phases(
                lambda: gen._encode(run.params, tokens, segments, positions, new_tokens, 1),
                lambda out: gen._greedy(run.params, *out, key, new_tokens, Sampling(), 0, -1),
                repeats)
        results.append({"batch": batch, "input_len": input_len, "new_tokens": new_tokens,
                        "encode_ms": round(1e3 * encode, 2),
                        **speed(batch, new_tokens, encode, decode)})
    return results
