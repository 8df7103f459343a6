"""Statistics of token batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def unigram_entropy(batches: Iterable[Mapping[str, np.ndarray]]) -> float:
    """Cross-entropy in nats per token of the best model that knows only token frequencies.

    Computed on the batches' own scored targets (weight != 0; padding excluded): the entropy of their empirical
    unigram distribution. A language model whose loss is not below this has learned no context.
    """
    counts = np.zeros(0, dtype=np.int64)
    for batch in batches:
        scored = batch["weights"] if "weights" in batch else batch["segment_ids"]
        targets = np.asarray(batch["targets"])[np.asarray(scored) != 0]
        batch_counts = np.bincount(targets.ravel(), minlength=len(counts))
        counts = np.pad(counts, (0, len(batch_counts) - len(counts))) + batch_counts
    total = counts.sum()
    if total == 0:
        raise ValueError("The batches contain no target tokens (all padding).")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
