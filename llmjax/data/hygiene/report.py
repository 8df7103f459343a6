"""What hygiene did to a corpus: counts per split, rule, PII type and quality flag, with a few
examples of each, as JSON (written next to the built dataset and copied into the run's workdir)
and as a few console lines.

Examples never carry PII: they are cut from the scrubbed text, and when scrubbing is off they
are scrubbed on the way into the report.
"""

from __future__ import annotations

import json
from typing import Any

from llmjax import paths
from llmjax.data.hygiene import pii

MAX_EXAMPLES = 3
_SNIPPET_CHARS = 160


class Report:
    """Accumulates per-document outcomes; `merge` adds another report's counts (e.g. a shard's)."""

    def __init__(self, config: dict[str, Any] | None = None):
        self.config = dict(config or {})
        self.splits: dict[str, dict[str, int]] = {}
        self.removed: dict[str, int] = {}
        self.pii: dict[str, int] = {}
        self.pii_documents = 0
        self.quality_flags: dict[str, int] = {}
        self.examples: dict[str, list[dict[str, str]]] = {}

    def add(self, doc_id: str, split: str, result, removed_by: str | None,
            tokens: int | None = None, duplicate_of: str | None = None) -> None:
        """Counts one document (a DocResult) and what happened to it (None: kept)."""
        s = self.splits.setdefault(split, dict.fromkeys(
            ("documents_in", "documents_out", "words_in", "words_out"), 0))
        words = len(result.text.split())
        s["documents_in"] += 1
        s["words_in"] += words
        if tokens is not None:
            s["tokens_in"] = s.get("tokens_in", 0) + tokens
        if removed_by is None:
            s["documents_out"] += 1
            s["words_out"] += words
            if tokens is not None:
                s["tokens_out"] = s.get("tokens_out", 0) + tokens
        else:
            self.removed[removed_by] = self.removed.get(removed_by, 0) + 1
            if self._wants(removed_by):
                example = {"doc_id": doc_id, "split": split, "text": _snippet(result.text)}
                if duplicate_of is not None:
                    example["duplicate_of"] = duplicate_of
                self.examples[removed_by].append(example)
        if result.pii:
            self.pii_documents += 1
        for kind, n in result.pii.items():
            self.pii[kind] = self.pii.get(kind, 0) + n
        for line in result.pii_examples:
            kind, _, context = line.partition(": ")
            if self._wants(f"pii_{kind}"):
                self.examples[f"pii_{kind}"].append({"doc_id": doc_id, "split": split,
                                                     "text": context})
        for flag in result.quality_flags:
            self.quality_flags[flag] = self.quality_flags.get(flag, 0) + 1
            if self._wants(f"quality_{flag}"):
                self.examples[f"quality_{flag}"].append(
                    {"doc_id": doc_id, "split": split, "text": _snippet(result.text)})

    def _wants(self, rule: str) -> bool:
        return len(self.examples.setdefault(rule, [])) < MAX_EXAMPLES

    def merge(self, other: "Report") -> "Report":
        for split, counts in other.splits.items():
            mine = self.splits.setdefault(split, {})
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v
        for mine, theirs in ((self.removed, other.removed), (self.pii, other.pii),
                             (self.quality_flags, other.quality_flags)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.pii_documents += other.pii_documents
        for rule, items in other.examples.items():
            mine = self.examples.setdefault(rule, [])
            mine.extend(items[:MAX_EXAMPLES - len(mine)])
        self.config = self.config or dict(other.config)
        return self

    def to_dict(self) -> dict[str, Any]:
        total = {k: sum(s.get(k, 0) for s in self.splits.values())
                 for k in sorted({k for s in self.splits.values() for k in s})}
        return {
            "config": self.config,
            "splits": {k: dict(v) for k, v in sorted(self.splits.items())},
            "total": total,
            "removed": dict(sorted(self.removed.items())),
            "pii": dict(sorted(self.pii.items())),
            "pii_documents": self.pii_documents,
            "quality_flags": dict(sorted(self.quality_flags.items())),
            "examples": {k: v for k, v in sorted(self.examples.items()) if v},
        }

    def summary_lines(self) -> list[str]:
        d = self.to_dict()
        t = d["total"]
        lines = [f"hygiene: {t.get('documents_in', 0)} documents in, "
                 f"{t.get('documents_out', 0)} kept ("
                 + ", ".join(f"{s} {c['documents_in']} -> {c['documents_out']}"
                             for s, c in d["splits"].items()) + ")"]
        lines.append("hygiene: removed " + (_counts(d["removed"]) or "nothing"))
        lines.append(f"hygiene: PII replaced in {d['pii_documents']} documents: "
                     + (_counts(d["pii"]) or "none"))
        mode = self.config.get("quality_filter", "report")
        if mode != "off":
            verb = "dropped" if mode == "drop" else "flagged, kept"
            lines.append(f"hygiene: quality ({verb}): "
                         + (_counts(d["quality_flags"]) or "no flags"))
        return lines

    def write(self, path) -> None:
        """The report as JSON at `path` (local or gs://)."""
        p = paths.path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _snippet(text: str) -> str:
    """The start of a document on one line, with any PII still in it replaced."""
    # Scrubbed before it is cut, so that no address or key is cut in half and missed.
    head = pii.scrub(text[:16 * _SNIPPET_CHARS])[0]
    return " ".join(head.split())[:_SNIPPET_CHARS]
