"""The data side of the closing VQA measurement: held-out questions, chance levels, scoring.

A model has learned to look at the image only if it beats, for each kind of question, what an
answer chosen without the image gets: `chance` (uniform over the kind's possible answers,
shapes.answer_space) and `majority` (always the split's most common answer of that kind, the
stronger blind baseline: "no" to every position question, say). The caller decodes greedily
from image_pipeline.vqa_prompt(question) and hands the answers to `vqa_accuracy`.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Iterator

import numpy as np

from llmjax.data import images as images_lib, shapes


def vqa_examples(data_cfg, split: str = "test") -> Iterator[dict[str, Any]]:
    """The shapes dataset's `split` as {"image": float32 [S, S, 3] in [-1, 1], "question",
    "answer", "kind", "objects"}, in stored order."""
    source = shapes.load_split(data_cfg, split)
    size = int(data_cfg.get("image_size", shapes.DEFAULTS["image_size"]))
    for i in range(len(source)):
        record = {k: v.decode() if isinstance(v, bytes) and k != "image" else v
                  for k, v in source[i].items()}
        yield {"image": images_lib.load_image(record["image"], size), "question": record["question"],
               "answer": record["answer"], "kind": record["kind"],
               "objects": json.loads(record["objects"])}


def chance_levels(examples) -> dict[str, dict[str, float]]:
    """Per kind: {"chance": 1 / possible answers, "majority": share of the most common answer,
    "count": questions of that kind} over `examples` (dicts with "kind" and "answer")."""
    answers = collections.defaultdict(collections.Counter)
    for e in examples:
        answers[e["kind"]][e["answer"]] += 1
    return {kind: {"chance": 1 / len(shapes.answer_space(kind)),
                   "majority": max(c.values()) / sum(c.values()), "count": sum(c.values())}
            for kind, c in sorted(answers.items())}


def normalize_answer(text: str) -> str:
    """Lower case, the first word only, without punctuation: "Red." and "red circle" are "red"."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").replace("?", " ").split()
    return words[0] if words else ""


def vqa_accuracy(predictions, examples) -> dict[str, dict[str, float]]:
    """Per kind (and "all"): accuracy of `predictions` (strings, aligned with `examples`) next to
    the kind's chance and majority baselines."""
    examples = list(examples)
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples; give one "
                         "answer per example.")
    right = collections.defaultdict(list)
    for p, e in zip(predictions, examples):
        hit = normalize_answer(p) == e["answer"]
        right[e["kind"]].append(hit)
        right["all"].append(hit)
    levels = chance_levels(examples)
    out = {kind: {"accuracy": float(np.mean(hits)), **levels.get(kind, {"count": len(hits)})}
           for kind, hits in right.items()}
    return out
