"""Pretraining objectives as data transformations: what the model reads and what it is scored on.

Each objective turns a packed row of token ids into a training example of fixed shapes; the model
never sees the objective, only `weights` (1 where a target is scored):

  mlm              BERT / RoBERTa masked language modelling: `mask_rate` (15%) of the tokens are
                   chosen; of those 80% become <mask>, 10% a random token, 10% stay. Targets are
                   the original tokens, scored only at the chosen positions. Static (one mask per
                   document, BERT) or dynamic (a new mask every time a row is read, RoBERTa).
  span_corruption  T5: `noise_density` (15%) of the tokens, in spans of mean length
                   `mean_noise_span_length` (3), are cut out of the encoder input, each span
                   replaced by one sentinel; the decoder targets are the sentinels each followed by
                   the span it stands for, then eos. Rows of `tokens_length` raw tokens give
                   exactly `seq_len` input and `target_length` target tokens (T5's
                   `random_spans_helper`).
  text_infilling   BART: spans with Poisson(`poisson_lambda` = 3) lengths covering `infilling_rate`
                   (30%) of the tokens each become a single <mask> (a length-0 span inserts one);
                   with probability `permute_sentences` the row's lines are first shuffled
                   (sentence permutation). The decoder reconstructs the original row (scored at
                   every non-padding position, as BART).

Encoder-decoder examples carry: inputs, segment_ids, positions ([seq_len], the encoder side) and
decoder_inputs (targets shifted right after a start token, bos), targets, decoder_segment_ids,
decoder_positions, weights ([target_length]). MLM examples carry the decoder-style keys inputs,
targets, segment_ids, positions, weights, all [seq_len].
"""

from __future__ import annotations

import math

import grain
import numpy as np

OBJECTIVES = ("causal_lm", "mlm", "span_corruption", "text_infilling")
ENCODER_DECODER_OBJECTIVES = ("span_corruption", "text_infilling")
MASK_PIECE = "<mask>"


def sentinel_piece(i: int) -> str:
    return f"<extra_id_{i}>"  # T5's names, so its vocabularies map onto ours


def reserved_pieces(data_cfg) -> list[str]:
    """Pieces a tokenizer trained for `data.objective` reserves: <mask> and the sentinels."""
    if data_cfg.get("objective", "causal_lm") == "causal_lm":
        return []
    return [MASK_PIECE] + [sentinel_piece(i) for i in range(int(data_cfg.get("num_sentinels", 100)))]


def sentinel_ids(data_cfg, tokenizer) -> list[int]:
    """The span-corruption sentinels: the tokenizer's <extra_id_N> pieces, or with
    data.sentinels_at_top the ids Hugging Face's T5 tokenizer appends after its SentencePiece
    vocabulary, <extra_id_0> last (vocab_size + num_sentinels - 1) and counting down."""
    if not data_cfg.get("sentinels_at_top", False):
        return tokenizer.sentinel_ids
    count = int(data_cfg.get("num_sentinels", 100))
    top = tokenizer.vocab_size + count - 1
    return list(range(top, top - count, -1))


def decoder_start_id(data_cfg, tokenizer) -> int:
    """The decoder's first input: bos, or pad where T5's conventions hold (sentinels at the top
    of the vocabulary, or a tokenizer without bos, as T5's spiece.model)."""
    if data_cfg.get("sentinels_at_top", False) or tokenizer.bos_id < 0:
        return tokenizer.pad_id
    return tokenizer.bos_id


def encoder_start_ids(data_cfg, tokenizer) -> list[int]:
    """What an encoder input starts with, in pretraining, seq2seq fine-tuning and decoding alike:
    nothing under T5's span corruption (its documents are tokenized without bos), else [bos]
    (BART's <s>)."""
    if data_cfg.get("objective") == "span_corruption" or tokenizer.bos_id < 0:
        return []
    return [tokenizer.bos_id]


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"data.objective={name!r} is not one of {OBJECTIVES}.")
    return name


# ---------------------------------------------------------------------------------------------
# Lengths


def span_corruption_lengths(inputs_length: int, noise_density: float,
                            mean_noise_span_length: float) -> tuple[int, int]:
    """(tokens_length, targets_length): the raw row length whose corruption fills exactly
    `inputs_length` encoder tokens (one sentinel per span and an eos), and the targets' length.
    The T5 paper's `random_spans_helper`, one extra token per span on both sides."""

    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

    if not 0 < noise_density < 1 or mean_noise_span_length < 1:
        raise ValueError(f"span corruption needs 0 < data.noise_density < 1 and "
                         f"data.mean_noise_span_length >= 1 (got {noise_density}, "
                         f"{mean_noise_span_length}).")
    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    # T5's adjustment so that at density 0.5 the targets are not longer than the inputs.
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets -= 1
    if round(tokens_length * noise_density) < 1 or tokens_length < 2:
        raise ValueError(f"seq_len={inputs_length} is too short for span corruption at "
                         f"data.noise_density={noise_density}: not one token would be noise; "
                         f"use seq_len >= {math.ceil(0.5 / noise_density) + 2}.")
    return tokens_length, targets


def target_length(data_cfg, seq_len: int) -> int:
    """Length of the decoder side of an encoder-decoder objective's examples."""
    objective = data_cfg.get("objective", "causal_lm")
    if objective == "span_corruption":
        return span_corruption_lengths(seq_len, data_cfg.noise_density,
                                       data_cfg.mean_noise_span_length)[1]
    if objective == "text_infilling":
        return seq_len  # the decoder reconstructs the original row
    raise ValueError(f"data.objective={objective!r} has no decoder side; encoder-decoder models "
                     f"train with one of {ENCODER_DECODER_OBJECTIVES}.")


def check_setup(data_cfg, tokenizer, seq_len: int) -> None:
    """One-line errors for a tokenizer or sequence length the objective cannot use."""
    objective = check_objective(data_cfg.get("objective", "causal_lm"))
    if objective == "causal_lm":
        return
    if not (objective == "span_corruption" and data_cfg.get("sentinels_at_top", False)):
        tokenizer.mask_id  # raises if the tokenizer reserves no <mask>
    if objective == "mlm" and seq_len * data_cfg.mask_rate < 1:
        raise ValueError(f"seq_len={seq_len} is too short for masked LM at data.mask_rate="
                         f"{data_cfg.mask_rate}: fewer than one token would be masked; use seq_len "
                         f">= {math.ceil(1 / data_cfg.mask_rate)}.")
    if objective == "text_infilling" and seq_len * data_cfg.infilling_rate < 2:
        raise ValueError(f"seq_len={seq_len} is too short for text infilling at "
                         f"data.infilling_rate={data_cfg.infilling_rate}; use seq_len >= "
                         f"{math.ceil(2 / data_cfg.infilling_rate)}.")
    if objective == "span_corruption":
        tokens_length, _ = span_corruption_lengths(seq_len, data_cfg.noise_density,
                                                   data_cfg.mean_noise_span_length)
        spans = max(1, int(round(round(tokens_length * data_cfg.noise_density)
                                 / data_cfg.mean_noise_span_length)))
        if spans > len(sentinel_ids(data_cfg, tokenizer)):
            raise ValueError(f"span corruption of seq_len={seq_len} needs {spans} sentinel ids but "
                             f"the tokenizer has {len(sentinel_ids(data_cfg, tokenizer))}; raise "
                             "data.num_sentinels (and retrain the tokenizer) or lower seq_len.")


# ---------------------------------------------------------------------------------------------
# BERT masking


def mlm_mask(tokens: np.ndarray, eligible: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
             mask_id: int, random_ids: tuple[int, int]) -> dict[str, np.ndarray]:
    """BERT's masking of one row: round(mask_rate * eligible) positions (at least one), chosen
    uniformly; 80% -> mask_id, 10% -> a uniform id in [random_ids), 10% unchanged."""
    candidates = np.flatnonzero(eligible)
    inputs, weights = tokens.copy(), np.zeros_like(tokens)
    if len(candidates):
        n = min(len(candidates), max(1, int(round(mask_rate * len(candidates)))))
        chosen = rng.choice(candidates, n, replace=False)
        u = rng.random(n)
        inputs[chosen[u < 0.8]] = mask_id
        rand = chosen[(u >= 0.8) & (u < 0.9)]
        inputs[rand] = rng.integers(*random_ids, len(rand))
        weights[chosen] = 1
    return {"inputs": inputs, "targets": tokens.copy(), "weights": weights}


# ---------------------------------------------------------------------------------------------
# T5 span corruption


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask: round(length * density) noise tokens in round(noise / mean) spans, span
    lengths a uniformly random composition; the row starts with non-noise, ends with noise."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_nonnoise = length - num_noise

    def segmentation(num_items, num_segments):
        # A uniformly random way to cut num_items into num_segments non-empty pieces.
        first = np.zeros(num_items, bool)
        first[1 + rng.choice(num_items - 1, num_segments - 1, replace=False)] = True
        return np.bincount(np.cumsum(first), minlength=num_segments)

    interleaved = np.stack([segmentation(num_nonnoise, num_spans),
                            segmentation(num_noise, num_spans)], axis=1).reshape(-1)
    starts = np.zeros(length, bool)
    starts[np.cumsum(interleaved)[:-1]] = True
    return np.cumsum(starts) % 2 == 1


def _spans_to_sentinels(tokens, noise, sentinel_ids):
    """Each run of `noise` becomes its sentinel (the i-th run gets sentinel_ids[i])."""
    prev = np.concatenate([[False], noise[:-1]])
    first = noise & ~prev
    out = np.where(first, np.asarray(sentinel_ids)[np.maximum(np.cumsum(first) - 1, 0)], tokens)
    return out[~(noise & prev)]


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, *, noise_density: float,
                    mean_noise_span_length: float, sentinel_ids, eos_id: int):
    """(inputs, targets) for one row of raw tokens, both ending in eos."""
    noise = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    inputs = np.append(_spans_to_sentinels(tokens, noise, sentinel_ids), eos_id)
    targets = np.append(_spans_to_sentinels(tokens, ~noise, sentinel_ids), eos_id)
    return inputs.astype(np.int32), targets.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# BART text infilling and sentence permutation


def permute_sentences(tokens: np.ndarray, is_end: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The row's sentences (runs ending at a token with is_end, here a line break) in random order."""
    cuts = np.flatnonzero(is_end[:-1]) + 1
    pieces = np.split(tokens, cuts)
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])


def text_infilling(tokens: np.ndarray, rng: np.random.Generator, *, rate: float, poisson_lambda: float,
                   mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted, is_masked): ceil(rate * len) tokens in spans of Poisson(lambda) lengths (the
    last trimmed to fit) are each replaced by one mask_id; a length-0 span inserts a mask_id.
    Spans neither overlap nor touch, so every mask in the output stands for exactly one span.
    `is_masked` marks the original tokens that were masked out."""
    n = len(tokens)
    num_to_mask = int(math.ceil(rate * n))
    lengths = []
    while sum(lengths) < num_to_mask:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - num_to_mask
    lengths = np.asarray(lengths, int)
    spans, inserts = lengths[lengths > 0], int((lengths == 0).sum())
    kept = n - num_to_mask
    # Place the spans in distinct gaps between kept tokens (kept + 1 gaps): they cannot touch.
    spans = spans[:kept + 1]
    gaps = np.sort(rng.choice(kept + 1, len(spans), replace=False))
    order = rng.permutation(len(spans))  # which span goes into which chosen gap
    is_masked = np.zeros(n, bool)
    out, src, prev_gap = [], 0, 0
    for gap, length in zip(gaps, spans[order]):
        out.append(tokens[src:src + gap - prev_gap])
        src += gap - prev_gap
        out.append([mask_id])
        is_masked[src:src + length] = True
        src += length
        prev_gap = gap
    out.append(tokens[src:])
    corrupted = np.concatenate([np.asarray(o, np.int64) for o in out])
    if inserts:
        at = np.sort(rng.integers(0, len(corrupted) + 1, inserts))
        corrupted = np.insert(corrupted, at, mask_id)
    return corrupted.astype(np.int32), is_masked


# ---------------------------------------------------------------------------------------------
# Grain transformations (applied to rows packed by llmjax/data/pipeline.py)


def _pad(x, length):
    out = np.zeros(length, np.int32)
    out[:min(len(x), length)] = x[:length]
    return out


def _encoder_decoder_example(inputs, targets, *, seq_len, target_len, start_id):
    n_in, n_tgt = min(len(inputs), seq_len), min(len(targets), target_len)
    dec_in = np.concatenate([[start_id], targets[:-1]])
    return {
        "inputs": _pad(inputs, seq_len),
        "segment_ids": (np.arange(seq_len) < n_in).astype(np.int32),
        "positions": np.where(np.arange(seq_len) < n_in, np.arange(seq_len), 0).astype(np.int32),
        "decoder_inputs": _pad(dec_in, target_len),
        "targets": _pad(targets, target_len),
        "decoder_segment_ids": (np.arange(target_len) < n_tgt).astype(np.int32),
        "decoder_positions": np.where(np.arange(target_len) < n_tgt, np.arange(target_len),
                                      0).astype(np.int32),
        "weights": (np.arange(target_len) < n_tgt).astype(np.int32),
    }


class MlmRow(grain.transforms.RandomMap):
    """Masks a packed row {tokens, tokens_segment_ids, tokens_positions} (dynamic masking), or a
    tokenized document {tokens} (static masking, before packing)."""

    def __init__(self, data_cfg, tokenizer):
        self.rate, self.mask_id = data_cfg.mask_rate, tokenizer.mask_id
        self.specials = np.asarray([tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id])
        # Random replacements are ordinary pieces: past the control ids and reserved symbols.
        self.random_ids = (tokenizer.first_ordinary_id, tokenizer.vocab_size)

    def random_map(self, row, rng):
        tokens = row["tokens"]
        segments = row.get("tokens_segment_ids", np.ones_like(tokens))
        eligible = (segments != 0) & ~np.isin(tokens, self.specials)
        out = mlm_mask(tokens, eligible, rng, mask_rate=self.rate, mask_id=self.mask_id,
                       random_ids=self.random_ids)
        if "tokens_segment_ids" in row:
            out.update(segment_ids=segments, positions=row["tokens_positions"])
        return {k: v.astype(np.int32) for k, v in out.items()}


class SpanCorruptionRow(grain.transforms.RandomMap):
    def __init__(self, data_cfg, tokenizer, seq_len: int):
        self.density, self.mean = data_cfg.noise_density, data_cfg.mean_noise_span_length
        self.seq_len = seq_len
        self.target_len = span_corruption_lengths(seq_len, self.density, self.mean)[1]
        self.sentinels, self.eos = sentinel_ids(data_cfg, tokenizer), tokenizer.eos_id
        self.start = decoder_start_id(data_cfg, tokenizer)

    def random_map(self, row, rng):
        tokens = row["tokens"][row["tokens_segment_ids"] != 0]
        if len(tokens) < 2:  # a stream's last scrap: nothing to corrupt, nothing scored
            inputs = targets = np.asarray([], np.int32)
        else:
            inputs, targets = span_corruption(tokens, rng, noise_density=self.density,
                                              mean_noise_span_length=self.mean,
                                              sentinel_ids=self.sentinels, eos_id=self.eos)
        return _encoder_decoder_example(inputs, targets, seq_len=self.seq_len,
                                        target_len=self.target_len, start_id=self.start)


class TextInfillingRow(grain.transforms.RandomMap):
    def __init__(self, data_cfg, tokenizer, seq_len: int):
        self.rate, self.lam = data_cfg.infilling_rate, data_cfg.poisson_lambda
        self.permute = data_cfg.permute_sentences
        self.mask_id, self.start, self.seq_len = tokenizer.mask_id, tokenizer.bos_id, seq_len
        self.line_end = np.zeros(tokenizer.vocab_size, bool)
        self.line_end[tokenizer.line_break_ids] = True

    def random_map(self, row, rng):
        # The decoder always reconstructs the original row; the encoder reads it permuted (by
        # lines) and infilled.
        targets = tokens = row["tokens"][row["tokens_segment_ids"] != 0]
        if len(tokens) >= 2:
            if self.permute and rng.random() < self.permute:
                tokens = permute_sentences(tokens, self.line_end[tokens], rng)
            inputs, _ = text_infilling(tokens, rng, rate=self.rate, poisson_lambda=self.lam,
                                       mask_id=self.mask_id)
        else:
            inputs = targets = np.asarray([], np.int32)
        # Length-0 spans can make the input longer than the row; the excess tail is cut.
        return _encoder_decoder_example(inputs, targets, seq_len=self.seq_len,
                                        target_len=self.seq_len, start_id=self.start)
