"""Document quality heuristics in the style of Gopher (Rae et al. 2021, appendix A) and C4.

Each rule names a flag; `flags` returns the flags a document raises. The thresholds are
Gopher's published ones. They were tuned on web text, so on code (the embedded corpus is Python)
several fire often (`#` comments raise the symbol ratio; short modules have too few words): that
is why the default `quality_filter="report"` counts flags and keeps the documents, and only
`"drop"` removes them.
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

FLAGS = (
    "too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio",
    "bullet_lines", "ellipsis_lines", "alpha_words", "duplicate_lines",
    "top_2gram", "top_3gram", "top_4gram", "lorem_ipsum",
)
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "‣", "⁃", "*", "-")
_ELLIPSES = ("...", "…")
_NO_ALPHA_WORD = re.compile(r"(?<!\S)(?:(?![^\W\d_])\S)+(?!\S)")  # a word without a letter
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


class Thresholds(Protocol):
    min_words: int
    max_words: int
    min_mean_word_length: float
    max_mean_word_length: float
    max_symbol_word_ratio: float
    max_bullet_lines_ratio: float
    max_ellipsis_lines_ratio: float
    min_alpha_words_ratio: float
    max_dup_line_fraction: float
    max_top_ngram_fraction: tuple[float, float, float]


def flags(text: str, t: Thresholds) -> tuple[str, ...]:
    """The FLAGS `text` raises under thresholds `t` (a HygieneConfig), in FLAGS order."""
    words = text.split()
    n = len(words)
    raised = set()
    if n < t.min_words:
        raised.add("too_few_words")
    if n > t.max_words:
        raised.add("too_many_words")
    if n:
        mean = sum(map(len, words)) / n
        if not t.min_mean_word_length <= mean <= t.max_mean_word_length:
            raised.add("mean_word_length")
        symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
        if symbols / n > t.max_symbol_word_ratio:
            raised.add("symbol_word_ratio")
        if 1 - len(_NO_ALPHA_WORD.findall(text)) / n < t.min_alpha_words_ratio:
            raised.add("alpha_words")
        raised.update(_top_ngrams(words, t.max_top_ngram_fraction))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > t.max_bullet_lines_ratio:
            raised.add("bullet_lines")
        ellipsis = sum(line.endswith(_ELLIPSES) for line in lines) / len(lines)
        if ellipsis > t.max_ellipsis_lines_ratio:
            raised.add("ellipsis_lines")
        if 1 - len(set(lines)) / len(lines) > t.max_dup_line_fraction:
            raised.add("duplicate_lines")
    if "lorem ipsum" in text.lower():
        raised.add("lorem_ipsum")
    return tuple(f for f in FLAGS if f in raised)


def _top_ngrams(words: list[str], limits: tuple[float, ...]) -> set[str]:
    """Gopher's repetition rule: the characters covered by the most frequent word n-gram (n=2,
    3, 4), over all characters in words, may not exceed limits[n-2]. Counted in numpy on a
    64-bit polynomial of word hashes (distinct n-grams colliding is a 2**-64 event)."""
    lowered = [w.lower() for w in words]
    # str hashes are salted per process but equal for equal words, which is all this needs.
    ids = np.fromiter(map(hash, lowered), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    raised = set()
    for n, limit in zip((2, 3, 4), limits):
        count = len(ids) - n + 1
        if count < 2 or total == 0:
            continue
        window = sum(lengths[i:i + count] for i in range(n))  # characters of each n-gram
        keys = ids[:count].copy()
        for i in range(1, n):
            keys = keys * _MULTIPLIER + ids[i:i + count]
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = counts.max()
        # Ties for the most frequent n-gram go to the longest (their order in `keys` follows the
        # per-process salted hashes, so any other pick could differ between processes).
        chars = int(window[first[counts == top]].max())
        if top > 1 and top * chars / total > limit:
            raised.add(f"top_{n}gram")
    return raised
