"""Exact and near-duplicate removal, and validation-leak removal across splits.

The per-document work (normalising, hashing, MinHash signatures) is in `exact_key` and
`signature`, pure functions that run in worker processes; `Deduplicator` is the serial pass that
sees the documents one by one in a fixed order, keeps the first of every group of copies, and
names the rule that removed each later one. Documents of another split than the train split are
offered first (see `clean`), so a training copy of a validation document is what goes, and it is
counted as a leak rather than as an ordinary duplicate.

Near duplicates: Jaccard similarity of the sets of word n-grams (`shingle` words), estimated by
MinHash (`num_perm` permutations, datasketch's affine64 scheme, a fixed seed, so every process
computes the same signature) and found by LSH banding; an LSH candidate is kept as a match only if
its estimated Jaccard similarity reaches `near_threshold`, which cuts LSH's false positives.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Protocol

import numpy as np

RULES = ("exact_duplicate", "near_duplicate", "validation_leak_exact", "validation_leak_near")
_SEED = 1
_SCHEME = "affine64"  # 64-bit hash values (numpy uint64); affine32 would halve their size
_PUNCT_RUN = re.compile(r"[^\w\s]+")
# One MinHash per num_perm in each process, whose permutations every signature reuses.
_TEMPLATES: dict[int, object] = {}
_WORD_HASHES: dict[str, int] = {}  # word -> 64-bit hash, per process
_WORD_CACHE_SIZE = 1 << 20
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: n-gram hashes are a polynomial in it


class Settings(Protocol):
    enabled: bool
    dedup_exact: bool
    dedup_near: bool
    near_threshold: float
    num_perm: int
    shingle: int


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation runs dropped, whitespace collapsed: what dedup compares."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT_RUN.sub(" ", text).split())


def exact_key(normalised: str) -> bytes:
    """sha256 of a `normalise`d text; b"" (never a duplicate) for a text with no words, such as
    an empty `__init__.py`: such documents train nothing, and calling them leaks would mislead."""
    return hashlib.sha256(normalised.encode("utf-8")).digest() if normalised else b""


def signature(normalised: str, num_perm: int, shingle: int) -> np.ndarray | None:
    """MinHash hash values (uint64[num_perm]) of the set of word `shingle`-grams of a
    `normalise`d text; None if it has no words. A text shorter than `shingle` words is one shingle.

    Each distinct word is hashed once (blake2b, 64 bits, cached per process) and an n-gram's hash
    is a polynomial of its words' hashes computed in numpy: the same set of n-grams as hashing
    each joined n-gram, without a Python-level hash per n-gram. datasketch then applies its
    permutations to these 64-bit values (an identity `hashfunc`).
    """
    MinHash = datasketch().MinHash

    words = normalised.split()
    if not words:
        return None
    cache = _WORD_HASHES
    if len(cache) > _WORD_CACHE_SIZE:
        cache.clear()
    h = np.fromiter((cache[w] if w in cache else cache.setdefault(w, _word_hash(w)) for w in words),
                    dtype=np.uint64, count=len(words))
    n = min(shingle, len(words))
    count = len(words) - n + 1
    grams = h[:count].copy()
    for i in range(1, n):
        grams = grams * _MULTIPLIER + h[i:i + count]  # uint64 arithmetic wraps modulo 2**64
    template = _TEMPLATES.get(num_perm)
    if template is None:
        template = _TEMPLATES[num_perm] = MinHash(num_perm=num_perm, seed=_SEED, scheme=_SCHEME)
    m = MinHash(seed=_SEED, scheme=_SCHEME, permutations=template.permutations,
                hashvalues=template.hashvalues.copy(), hashfunc=_identity)
    m.update_batch(np.unique(grams))
    return np.asarray(m.hashvalues, dtype=np.uint64)


def datasketch():
    """The datasketch module (imported on first use: it brings scipy), or one ImportError saying
    how to get it or do without."""
    try:
        import datasketch as ds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("Near-duplicate removal (data.hygiene.dedup_near) needs datasketch: "
                          "pip install datasketch==2.0.0, or set "
                          "--config.data.hygiene.dedup_near=False.") from e
    return ds


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _identity(value):
    return value


class Deduplicator:
    """Keeps the first document of every exact or near-duplicate group, in the order offered."""

    def __init__(self, cfg: Settings):
        self._cfg = cfg
        self._exact: dict[bytes, tuple[str, str]] = {}  # key -> (doc_id, split) of the kept copy
        self._lsh = None
        self._signatures: dict[str, object] = {}  # doc_id -> LeanMinHash of kept documents
        self._kept: dict[str, tuple[int, str]] = {}  # doc_id -> (order, split) of kept documents
        self.last_match: str | None = None  # the kept document the last removed one duplicated
        if cfg.dedup_near and cfg.enabled:
            self._lsh = datasketch().MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm)

    def add(self, doc_id: str, result, split: str) -> str | None:
        """None to keep `result` (a DocResult), else the rule (one of RULES) that removes it."""
        self.last_match = None
        if not self._cfg.enabled:
            return None
        if self._cfg.dedup_exact and result.exact_key:
            seen = self._exact.get(result.exact_key)
            if seen is not None:
                self.last_match = seen[0]
                return "validation_leak_exact" if seen[1] != split else "exact_duplicate"
        lean = None
        if self._lsh is not None and result.minhash is not None:
            lean = datasketch().LeanMinHash(seed=_SEED, hashvalues=result.minhash, scheme=_SCHEME)
            match = self._near_match(lean)
            if match is not None:
                self.last_match = match
                return "validation_leak_near" if self._kept[match][1] != split else "near_duplicate"
        if self._cfg.dedup_exact and result.exact_key:
            self._exact.setdefault(result.exact_key, (doc_id, split))
        if lean is not None:
            if doc_id in self._signatures:
                raise ValueError(f"Document id {doc_id!r} was offered twice; ids must be unique.")
            self._lsh.insert(doc_id, lean, check_duplication=False)
            self._signatures[doc_id] = lean
            self._kept[doc_id] = (len(self._kept), split)
        return None

    def _near_match(self, lean) -> str | None:
        """The earliest kept candidate whose estimated Jaccard similarity reaches the threshold
        (LSH returns candidates as a set; taking the earliest makes the answer stable)."""
        hits = [k for k in self._lsh.query(lean)
                if lean.jaccard(self._signatures[k]) >= self._cfg.near_threshold]
        return min(hits, key=lambda k: self._kept[k][0]) if hits else None
