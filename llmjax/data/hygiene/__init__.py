"""Data hygiene: exact and near-duplicate removal (also across splits, so no validation document
leaks into training), PII and secret scrubbing, quality flags, and a report of all of it.

    cfg = HygieneConfig.from_config(config.data.hygiene)
    kept, report = clean([(doc_id, split, text), ...], cfg, processes=4)
    print("\n".join(report.summary_lines())); report.write(path)

Local corpora (data.name 'stdlib' and 'text') run it when they are built (llmjax/data/corpus.py).
A pipeline that shards the work calls `process_document` in its workers and feeds the results to
one `Deduplicator` and `Report` in a fixed order. Modules: pii.py (placeholders), quality.py
(Gopher/C4 flags), dedup.py (sha256 + MinHash LSH), report.py, core.py (settings and `clean`).
"""

from llmjax.data.hygiene.core import (
    QUALITY_MODES, QUALITY_RULE, DocResult, HygieneConfig, clean, process_document)
from llmjax.data.hygiene.dedup import RULES, Deduplicator
from llmjax.data.hygiene.pii import PLACEHOLDERS
from llmjax.data.hygiene.report import Report

__all__ = [
    "PLACEHOLDERS", "QUALITY_MODES", "QUALITY_RULE", "RULES", "DocResult", "Deduplicator",
    "HygieneConfig", "Report", "clean", "process_document",
]
