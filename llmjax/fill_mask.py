"""Fill-mask for the encoder family (BERT, RoBERTa): the likeliest tokens at each <mask>.

    python -m llmjax.generate --workdir=BERT_RUN --prompt="def f(x):<mask> x + 1"
    --config.sample.top_k=5                                           # candidates per mask

A text is tokenized as in MLM pretraining ([bos] + pieces + [eos]); the tokenizer's <mask> piece
(`Tokenizer.mask_id`) marks the positions to fill. One forward pass gives the MLM logits at every
position; each mask's candidates are the top-k of its softmax over the whole vocabulary (so their
probabilities sum to at most 1), best first. Masks are filled independently, not jointly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass
class Candidates:
    position: int  # the mask's index in the tokenized text
    ids: list[int]  # best first
    probs: list[float]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _top_k(graphdef, params, tokens, segments, positions, k):
    logits = nnx.merge(graphdef, params)(tokens, segments, positions)
    return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)


def fill_mask(graphdef, model_cfg, params, rows: Sequence[Sequence[int]], *, mask_id: int,
              top_k: int = 5) -> list[list[Candidates]]:
    """For each row of token ids, the top-k candidates of each `mask_id` position (in order)."""
    if model_cfg.family != "encoder":
        raise ValueError(f"fill-mask needs model.family='encoder' (BERT, RoBERTa), not "
                         f"{model_cfg.family!r}.")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1 for fill-mask; set "
                         "--config.sample.top_k=5 or similar.")
    for i, row in enumerate(rows):
        if mask_id not in row:
            raise ValueError(f"text {i} has no <mask>; put <mask> where a token should be "
                             "predicted, e.g. 'import <mask>'.")
        if len(row) > model_cfg.max_len:
            raise ValueError(f"text {i} has {len(row)} tokens but the encoder's context is "
                             f"model.max_len={model_cfg.max_len} tokens; shorten it.")
    width = -(-max(len(r) for r in rows) // 16) * 16
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], segments[i, :len(row)] = row, 1
    positions = np.where(segments != 0, np.arange(width), 0).astype(np.int32)
    probs, ids = jax.device_get(_top_k(graphdef, params, tokens, segments, positions,
                                       min(top_k, model_cfg.vocab_size)))
    return [[Candidates(j, ids[i, j].tolist(), probs[i, j].tolist())
             for j, t in enumerate(row) if t == mask_id] for i, row in enumerate(rows)]


def encode_text(tokenizer, text: str) -> list[int]:
    """[bos] + pieces + [eos], as the MLM pipeline tokenizes a document."""
    if not text:
        raise ValueError("the text is empty; give a text with at least one <mask> to fill.")
    return [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def fill_mask_text(graphdef, model_cfg, params, tokenizer, texts, *, top_k: int) -> list[str]:
    """One line per mask: `<mask> 1: 'piece' 0.412, 'other' 0.101, ...`."""
    rows = [encode_text(tokenizer, t) for t in texts]
    out = []
    for cands in fill_mask(graphdef, model_cfg, params, rows, mask_id=tokenizer.mask_id,
                           top_k=top_k):
        out.append("\n".join(
            f"<mask> {n + 1}: " + ", ".join(f"{tokenizer.decode([t])!r} {p:.3f}"
                                            for t, p in zip(c.ids, c.probs))
            for n, c in enumerate(cands)))
    return out
