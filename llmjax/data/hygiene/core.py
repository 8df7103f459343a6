"""The hygiene settings, the per-document pass and `clean`, which runs both passes over a corpus.

Two passes, so the expensive part parallelises:
  1. `process_document` (pure, picklable; runs in worker processes): PII scrubbing, quality
     flags, the exact-dedup key and the MinHash signature of one document.
  2. `Deduplicator.add` (serial, in a fixed order): keeps or removes each document.
Held-out splits go first in pass 2, so a training copy of a validation document is removed (a
leak), never the validation document.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import math
import multiprocessing
from collections.abc import Iterable
from typing import Any

import numpy as np

from llmjax.data.hygiene import dedup, pii, quality
from llmjax.data.hygiene.report import Report

QUALITY_MODES = ("report", "drop", "off")
QUALITY_RULE = "low_quality"  # the removal rule of quality_filter="drop"
TRAIN_SPLIT = "train"
# Bumped whenever the same settings start giving different output; part of `cache_key`, so a
# corpus built by an older version is rebuilt.
VERSION = 1


@dataclasses.dataclass(frozen=True)
class HygieneConfig:
    """What hygiene does; built from the config section `data.hygiene` by `from_config`."""

    enabled: bool = True  # False: documents pass through untouched (the report only counts them)
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8  # Jaccard similarity of word shingles, estimated by MinHash
    num_perm: int = 128
    shingle: int = 5  # word n-grams
    scrub_pii: bool = True
    quality_filter: str = "report"  # "report" (flag and count, keep) | "drop" | "off"
    # Gopher's thresholds (Rae et al. 2021, appendix A); see quality.py.
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    max_dup_line_fraction: float = 0.3
    max_top_ngram_fraction: tuple[float, float, float] = (0.20, 0.18, 0.16)  # n = 2, 3, 4
    processes: int = 1  # worker processes for pass 1 (not part of the output: see cache_key)

    @classmethod
    def from_config(cls, cfg=None) -> "HygieneConfig":
        """From a ConfigDict or dict (None: the defaults); a bad key or value is one ValueError."""
        values = dict(cfg.items() if hasattr(cfg, "items") else (cfg or {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"; did you mean {close[0]!r}" if close else ""
                raise ValueError(f"data.hygiene.{key} is not a hygiene setting{hint} (the "
                                 f"settings: {', '.join(fields)}).")
        for key, value in values.items():
            values[key] = _check(key, value, fields[key].default)
        out = cls(**values)
        if out.quality_filter not in QUALITY_MODES:
            raise ValueError(f"data.hygiene.quality_filter={out.quality_filter!r} is not one of "
                             f"{QUALITY_MODES}: 'report' flags and keeps, 'drop' removes, 'off' "
                             "skips.")
        if not 0 < out.near_threshold <= 1:
            raise ValueError(f"data.hygiene.near_threshold={out.near_threshold!r} must be in "
                             "(0, 1] (the Jaccard similarity above which two documents are near "
                             "duplicates).")
        for key, low in (("num_perm", 16), ("shingle", 1), ("processes", 1), ("min_words", 0)):
            if getattr(out, key) < low:
                raise ValueError(f"data.hygiene.{key}={getattr(out, key)!r} must be at least "
                                 f"{low}.")
        if out.dedup_near and out.enabled:
            try:  # LSH needs at least two bands for this threshold and num_perm
                dedup.datasketch().MinHashLSH(threshold=out.near_threshold, num_perm=out.num_perm)
            except ValueError as e:
                raise ValueError(f"data.hygiene.near_threshold={out.near_threshold} with num_perm="
                                 f"{out.num_perm} leaves MinHash LSH no usable banding ({e}); "
                                 "lower the threshold or raise num_perm.") from None
        if len(out.max_top_ngram_fraction) != 3:
            raise ValueError(f"data.hygiene.max_top_ngram_fraction={out.max_top_ngram_fraction!r} "
                             "must hold three fractions (for word 2-, 3- and 4-grams).")
        return out

    def cache_key(self) -> tuple:
        """The settings that change the output (not `processes`): part of a corpus's cache key."""
        if not self.enabled:
            return ("off",)
        return (("version", VERSION),) + tuple(
            (k, v) for k, v in sorted(dataclasses.asdict(self).items()) if k != "processes")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(key: str, value, default):
    """`value` typed like `default`, or one ValueError sentence."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"data.hygiene.{key}={value!r} must be true or false.")
        return value
    if isinstance(default, tuple):
        try:
            value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"data.hygiene.{key}={value!r} must be a tuple of numbers, e.g. "
                             f"{default!r}.") from None
        if not all(0 <= v <= 1 for v in value):
            raise ValueError(f"data.hygiene.{key}={value!r} must hold fractions in [0, 1].")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"data.hygiene.{key}={value!r} must be a string.")
        return value
    kind = type(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and value != int(value)):
        raise ValueError(f"data.hygiene.{key}={value!r} must be a finite {kind.__name__}.")
    value = kind(value)
    if value < 0:
        raise ValueError(f"data.hygiene.{key}={value!r} must not be negative.")
    return value


@dataclasses.dataclass(frozen=True)
class DocResult:
    """Pass 1's answer for one document."""

    text: str  # the scrubbed text (the original if scrub_pii is off)
    pii: dict[str, int]  # PII type -> placeholders written
    pii_examples: list[str]  # "TYPE: context around the placeholder" (the value is masked)
    quality_flags: tuple[str, ...]
    exact_key: bytes  # sha256 of the normalised text (b"": no exact dedup, or no words)
    minhash: np.ndarray | None  # uint64[num_perm] (None without near dedup, or with no words)


def process_document(text: str, cfg: HygieneConfig) -> DocResult:
    """Pass 1 on one document: scrub, flag, hash. Pure; runs in worker processes."""
    if not cfg.enabled:
        return DocResult(text, {}, [], (), b"", None)
    counts, examples = {}, []
    if cfg.scrub_pii:
        text, counts, found = pii.scrub(text)
        examples = [f"{kind}: {context}" for kind, context in found]
    flags = quality.flags(text, cfg) if cfg.quality_filter != "off" else ()
    normalised = dedup.normalise(text) if cfg.dedup_exact or cfg.dedup_near else ""
    key = dedup.exact_key(normalised) if cfg.dedup_exact else b""
    minhash = dedup.signature(normalised, cfg.num_perm, cfg.shingle) if cfg.dedup_near else None
    return DocResult(text, counts, examples, flags, key, minhash)


def clean(docs: Iterable[tuple[str, str, str]], cfg: HygieneConfig, processes: int = 1,
          progress=None) -> tuple[list[tuple[str, str, str]], Report]:
    """(doc_id, split, text) -> the kept (doc_id, split, scrubbed text) and the report.

    Documents of held-out splits (any but "train") are processed first; the kept ones come back
    in that order. `processes` > 1 runs pass 1 in that many worker processes (spawned, so it is
    safe in a process that already runs JAX threads); the result does not depend on it.
    `progress` (a tqdm bar, optional) is advanced once per document.
    """
    docs = sorted(docs, key=lambda d: d[1] == TRAIN_SPLIT)  # stable: held-out splits first
    report = Report(cfg.to_dict())
    deduper = dedup.Deduplicator(cfg)
    kept = []
    work = functools.partial(process_document, cfg=cfg)
    texts = (text for _, _, text in docs)
    with _map(work, texts, processes, len(docs)) as results:
        for (doc_id, split, _), result in zip(docs, results):
            removed = None
            if cfg.quality_filter == "drop" and result.quality_flags:
                removed = QUALITY_RULE
            else:
                removed = deduper.add(doc_id, result, split)
            report.add(doc_id, split, result, removed,
                       duplicate_of=deduper.last_match if removed != QUALITY_RULE else None)
            if removed is None:
                kept.append((doc_id, split, result.text))
            if progress is not None:
                progress.update()
    return kept, report


class _map:
    """`map(fn, items)` in this process, or in order over `processes` spawned worker processes.

    A process pool from concurrent.futures, not multiprocessing.Pool: a worker that dies (e.g. a
    script without an `if __name__ == "__main__":` guard re-running itself under spawn) breaks the
    pool with an error instead of being restarted forever.
    """

    def __init__(self, fn, items, processes: int, total: int):
        self._fn, self._items = fn, items
        self._processes = max(1, min(processes, total))
        self._chunk = max(1, total // (self._processes * 8))
        self._pool = None

    def __enter__(self):
        if self._processes == 1:
            return map(self._fn, self._items)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self._processes, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.map(self._fn, self._items, chunksize=self._chunk)

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
