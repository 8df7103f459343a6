"""Evaluation tasks as data: a task is a small YAML or JSON spec naming a kind, a data file, the
fields to read, a prompt template and the metrics; the code is one runner per kind.

Kinds (`KINDS`) and what they ask of the model (an `llmjax.evaluation.lm.LM`, or anything with
the same methods):
  perplexity       rolling log-likelihood of whole documents -> token/word/byte perplexity,
                   bits per byte;
  multiple_choice  log-likelihood of each choice after the prompt -> accuracy, accuracy_norm;
  generation       greedy `generate_until` after a few-shot prompt -> exact_match, f1, rouge_l,
                   bleu, chrf against the target;
  classification   encoders: `classify` (argmax label); decoders and encoder-decoders: each
                   label as the continuation of the prompt -> accuracy, macro_f1;
  bias_pairs       CrowS-Pairs columns (sent_more, sent_less, stereo_antistereo, bias_type):
                   the share of pairs whose more stereotypical sentence is the more likely one,
                   overall and per bias type (50% is no preference).

A spec's `data` is a path (relative to the spec, absolute or `~`) to .jsonl, .json (a list),
.csv or .txt (one document), or `stdlib:<source>` for examples built at run time from this
interpreter's standard library (`SOURCES`). Shipped specs live in task_files/; `get` takes
their name or the path of any spec. docs/evaluation.md describes every key.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import pathlib
import random
from typing import Any

from llmjax.evaluation import metrics as M

TASK_DIR = pathlib.Path(__file__).parent / "task_files"
SPEC_SUFFIXES = (".yaml", ".yml", ".json")

# Metrics each kind can report (the first group is its default list).
KINDS = {
    "perplexity": ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("accuracy", "accuracy_norm"),
    "generation": ("exact_match", "f1", "rouge_l", "bleu", "chrf"),
    "classification": ("accuracy", "macro_f1"),
    "bias_pairs": ("pct_stereotype", "likelihood_diff"),
}
DEFAULT_METRICS = {**KINDS, "generation": ("exact_match", "f1")}
# Fields of the example each kind reads, with defaults (None: the spec must name it).
FIELDS = {
    "perplexity": {"text": "text"},
    "multiple_choice": {"prompt": None, "choices": "choices", "answer": "answer"},
    "generation": {"prompt": None, "target": "target"},
    "classification": {"prompt": "{text}", "text": "text", "label": "label"},
    "bias_pairs": {},
}
SPEC_KEYS = ("name", "kind", "description", "data", "metrics", "few_shot", "target_delimiter",
             "labels", "until", "max_gen_toks", "prompt", "text", "target", "choices", "answer",
             "label")
CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


def _stdlib(name: str):
    @functools.cache  # deterministic for this interpreter; checking then running reads it once
    def load() -> list[dict]:
        from llmjax.data import tasks as data_tasks
        if name == "held_out_documents":
            return data_tasks.held_out_documents()
        if name == "held_out_definitions":
            return data_tasks.held_out_definitions()
        split = name.removeprefix("modules_")
        return data_tasks.stdlib_module_examples(form="classification")[split]
    return load


# `data: stdlib:<name>`: examples built from the standard library (llmjax/data/tasks.py).
SOURCES = {
    "held_out_documents": _stdlib("held_out_documents"),  # {path, text}: never trained on
    "held_out_definitions": _stdlib("held_out_definitions"),  # {docstring, name, choices, answer}
    "modules_train": _stdlib("modules_train"),  # {text, label}: stdlib_modules' train split
    "modules_validation": _stdlib("modules_validation"),
}


class TaskNotApplicable(ValueError):
    """The task's kind cannot be scored with this model (its family or its methods)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A loaded spec: `fields` maps each role (prompt, target, choices, ...) to its field name or
    template; `data` and `few_shot["data"]` are resolved paths or `stdlib:` sources."""

    name: str
    kind: str
    data: str
    fields: dict[str, str]
    metrics: tuple[str, ...]
    description: str = ""
    few_shot: dict[str, Any] = dataclasses.field(default_factory=dict)
    target_delimiter: str = " "
    labels: tuple[str, ...] = ()
    until: tuple[str, ...] = ("\n",)
    max_gen_toks: int = 64
    spec_path: str = ""

    def examples(self) -> list[dict]:
        return read_examples(self.data, self.name)


# -- The registry ---------------------------------------------------------------------------

def shipped() -> dict[str, pathlib.Path]:
    """{name: spec path} of the specs in task_files/ (the file's stem is the task's name)."""
    return {p.stem: p for p in sorted(TASK_DIR.iterdir()) if p.suffix in SPEC_SUFFIXES}


def get(name_or_path: str) -> Task:
    """A shipped task by name, or the spec at a path (any name ending in .yaml, .yml or .json)."""
    if name_or_path.endswith(SPEC_SUFFIXES) or os.sep in name_or_path:
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(f"the task spec {name_or_path!r} does not exist.")
        return load_spec(path)
    known = shipped()
    if name_or_path not in known:
        raise ValueError(f"unknown task {name_or_path!r}; the shipped tasks are "
                         f"{', '.join(known)} (or give the path of a .yaml/.json spec).")
    return load_spec(known[name_or_path])


def load_spec(path: str | os.PathLike) -> Task:
    """Reads and checks one spec; every mistake is a ValueError of one sentence naming the file."""
    path = pathlib.Path(path)
    where = f"task spec {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} cannot be read: {_one_line(e)}.") from e
    if path.suffix == ".json":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {_one_line(e)}.") from e
    else:
        import yaml  # PyYAML, a dependency of ml_collections
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{where} is not valid YAML: {_one_line(e)}.") from e
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping of keys (name, kind, data, ...).")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; the keys are {', '.join(SPEC_KEYS)}.")
    for key in ("name", "kind", "data"):
        if not spec.get(key):
            raise ValueError(f"{where} is missing {key!r} (every spec needs name, kind and data).")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"{where} has kind {kind!r}; the kinds are {', '.join(KINDS)}.")
    fields = {}
    for role, default in FIELDS[kind].items():
        value = spec.get(role, default)
        if value is None:
            raise ValueError(f"{where}: kind {kind!r} needs {role!r} (a str.format template over "
                             "the example's fields, e.g. 'Question: {question}\\nAnswer:').")
        fields[role] = str(value)
    for key in ("metrics", "labels", "until"):  # (until may also be one string)
        allowed = (list, str) if key == "until" else list
        if key in spec and not isinstance(spec[key], allowed):
            raise ValueError(f"{where}: {key!r} must be a list, e.g. {key}: [a, b].")
    if not isinstance(spec.get("max_gen_toks", 64), int) or spec.get("max_gen_toks", 64) < 1:
        raise ValueError(f"{where}: 'max_gen_toks' must be a positive whole number of tokens.")
    chosen = tuple(spec.get("metrics") or DEFAULT_METRICS[kind])
    bad = [m for m in chosen if m not in KINDS[kind]]
    if bad:
        raise ValueError(f"{where}: metric(s) {bad} do not apply to kind {kind!r}; it has "
                         f"{', '.join(KINDS[kind])}.")
    few_shot = dict(spec.get("few_shot") or {})
    if few_shot and kind in ("perplexity", "bias_pairs"):
        raise ValueError(f"{where}: kind {kind!r} scores text without a prompt; it takes no "
                         "few_shot.")
    if few_shot:
        extra = sorted(set(few_shot) - {"k", "data", "seed", "separator"})
        if extra or not isinstance(few_shot.get("k"), int) or few_shot["k"] < 0:
            raise ValueError(f"{where}: few_shot takes k (a count), data, seed and separator "
                             f"(got {sorted(few_shot)}).")
        if "data" in few_shot:
            few_shot["data"] = _resolve_data(str(few_shot["data"]), path)
    until = spec.get("until", ["\n"])
    return Task(name=str(spec["name"]), kind=kind, data=_resolve_data(str(spec["data"]), path),
                fields=fields, metrics=chosen, description=str(spec.get("description", "")),
                few_shot=few_shot, target_delimiter=str(spec.get("target_delimiter", " ")),
                labels=tuple(str(x) for x in spec.get("labels") or ()),
                until=(until,) if isinstance(until, str) else tuple(until),
                max_gen_toks=spec.get("max_gen_toks", 64), spec_path=str(path))


def _resolve_data(data: str, spec_path: pathlib.Path) -> str:
    if data.startswith("stdlib:"):
        if data[len("stdlib:"):] not in SOURCES:
            raise ValueError(f"task spec {str(spec_path)!r}: data {data!r} is not a built-in "
                             f"source; they are {', '.join('stdlib:' + s for s in SOURCES)}.")
        return data
    path = pathlib.Path(data).expanduser()
    return str(path if path.is_absolute() else (spec_path.parent / path).resolve())


def read_examples(data: str, task_name: str = "") -> list[dict]:
    """The examples of a data file (.jsonl, .json list, .csv with a header, .txt = one document
    {"text", "path"}) or of a `stdlib:` source."""
    if data.startswith("stdlib:"):
        return [dict(e) for e in SOURCES[data[len("stdlib:"):]]()]
    path = pathlib.Path(data)
    where = f"task {task_name!r}: data file {data!r}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist.")
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        elif path.suffix == ".txt":
            rows = [{"text": path.read_text(encoding="utf-8"), "path": str(path)}]
        else:
            raise ValueError(f"{where} must end in .jsonl, .json, .csv or .txt")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{where} cannot be parsed: {_one_line(e)}.") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where} must hold one JSON object (or CSV row) per example.")
    if not rows:
        raise ValueError(f"{where} holds no examples.")
    return rows


def _one_line(error: BaseException) -> str:
    lines = [x.strip() for x in str(error).strip().splitlines() if x.strip()]
    return (lines[0] if lines else type(error).__name__).rstrip(".")


# -- Running --------------------------------------------------------------------------------

def check_applies(task: Task, lm) -> None:
    """Raises TaskNotApplicable (one sentence) when `lm` cannot score `task`."""
    family = lm.family
    if family == "encoder":
        if task.kind == "classification":
            if not lm.labels:
                raise TaskNotApplicable(
                    f"task {task.name!r} classifies, but this encoder has no classification "
                    "head (fine-tune it with data.task='classification' first).")
            return
        if task.kind == "bias_pairs":
            if not hasattr(lm, "masked_logprob") or lm.labels:
                raise TaskNotApplicable(
                    f"task {task.name!r} (bias_pairs) needs sentence likelihoods; an encoder "
                    "gives them only as pseudo-log-likelihoods of its masked-LM head, which this "
                    "model does not have (a classification head, or no masked_logprob).")
            return
        raise TaskNotApplicable(f"task {task.name!r} is {task.kind}, which needs a decoder or an "
                                "encoder-decoder (an encoder only fills masks and classifies).")


def prepare(task: Task, lm, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(few-shot examples, examples to score) after checking that `lm` can score the task and
    that every example has the fields the spec reads; `limit` keeps the first examples (after
    the few-shot ones are set aside)."""
    check_applies(task, lm)
    shots, examples = _split_few_shot(task, task.examples())
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples left to score.")
    for i, example in enumerate(shots + examples):
        _check_fields(task, example, i, lm.family)
    return shots, examples


def run(task: Task, lm, limit: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """Scores `lm` on `task`: {metric: value, ..., "n": number of examples scored}."""
    shots, examples = prepare(task, lm, limit)
    runner = {"perplexity": _perplexity, "multiple_choice": _multiple_choice,
              "generation": _generation, "classification": _classification,
              "bias_pairs": _bias_pairs}[task.kind]
    result = runner(task, lm, examples, shots, batch_size)
    # Per-group values ("pct_stereotype/gender") come with their metric.
    return {**{k: v for k, v in result.items() if k.split("/")[0] in task.metrics},
            "n": len(examples)}


def _split_few_shot(task: Task, examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(shots, examples to score): k shots drawn with a fixed seed from the few-shot data, or
    from the task's own data (then they are not scored)."""
    k = task.few_shot.get("k", 0)
    if not k:
        return [], examples
    rng = random.Random(task.few_shot.get("seed", 1234))
    if "data" in task.few_shot and task.few_shot["data"] != task.data:
        pool = read_examples(task.few_shot["data"], task.name)
        return rng.sample(pool, min(k, len(pool))), examples
    chosen = set(rng.sample(range(len(examples)), min(k, len(examples) - 1)))
    return ([examples[i] for i in sorted(chosen)],
            [e for i, e in enumerate(examples) if i not in chosen])


def _check_fields(task: Task, example: dict, index: int, family: str) -> None:
    """One sentence naming the fields the spec reads that the example lacks."""
    fields = task.fields
    needed = {"perplexity": [fields.get("text")],
              "multiple_choice": [fields.get("choices"), fields.get("answer")],
              "generation": [fields.get("target")],
              "classification": [fields.get("label")] + (
                  [fields.get("text")] if family == "encoder" else []),
              "bias_pairs": list(CROWS_COLUMNS)}[task.kind]
    missing = [f for f in needed if f not in example]
    if "prompt" in fields and not (task.kind == "classification" and family == "encoder"):
        try:
            fields["prompt"].format(**example)
        except KeyError as e:
            missing.append(e.args[0])
        except (IndexError, ValueError) as e:
            raise ValueError(f"task {task.name!r}: the prompt template {fields['prompt']!r} is "
                             f"not a valid str.format template ({_one_line(e)}).") from e
    if missing:
        raise ValueError(f"task {task.name!r}: example {index} has no field(s) "
                         f"{sorted(set(missing))} (it has {sorted(example)}); fix the spec's "
                         "field names or the data.")


def _prompt(task: Task, example: dict) -> str:
    return task.fields["prompt"].format(**example)


def _answer_text(task: Task, example: dict) -> str:
    """What follows the prompt in a few-shot example: the target, right choice or label."""
    if task.kind == "generation":
        target = example[task.fields["target"]]
        return target if isinstance(target, str) else target[0]
    if task.kind == "multiple_choice":
        choices = example[task.fields["choices"]]
        return choices[_answer_index(task, example)]
    return str(example[task.fields["label"]])


def _context(task: Task, example: dict, shots: list[dict]) -> str:
    separator = task.few_shot.get("separator", "\n\n")
    prefix = "".join(_prompt(task, s) + task.target_delimiter + _answer_text(task, s) + separator
                     for s in shots)
    return prefix + _prompt(task, example)


def _perplexity(task, lm, examples, shots, batch_size):
    del shots
    texts = [str(e[task.fields["text"]]) for e in examples]
    scored = lm.loglikelihood_rolling(texts, batch_size=batch_size)
    return M.perplexities(logprob=sum(s["logprob"] for s in scored),
                          tokens=sum(s["tokens"] for s in scored),
                          words=sum(M.count_words(t) for t in texts),
                          num_bytes=sum(M.count_bytes(t) for t in texts))


def _answer_index(task: Task, example: dict) -> int:
    choices = example[task.fields["choices"]]
    answer = example[task.fields["answer"]]
    if isinstance(answer, str) and not answer.strip().isdigit():
        if answer not in choices:
            raise ValueError(f"task {task.name!r}: the answer {answer!r} is not one of the "
                             f"choices {choices}.")
        return choices.index(answer)
    index = int(answer)
    if not 0 <= index < len(choices):
        raise ValueError(f"task {task.name!r}: answer index {index} is outside the "
                         f"{len(choices)} choices.")
    return index


def _multiple_choice(task, lm, examples, shots, batch_size):
    choices = [[str(c) for c in e[task.fields["choices"]]] for e in examples]
    answers = [_answer_index(task, e) for e in examples]
    requests = [(_context(task, e, shots), task.target_delimiter + c)
                for e, cs in zip(examples, choices) for c in cs]
    flat = [lp for lp, _ in lm.loglikelihood(requests, batch_size=batch_size)]
    scores, i = [], 0
    for cs in choices:
        scores.append(flat[i:i + len(cs)])
        i += len(cs)
    return {"accuracy": M.accuracy(scores, answers),
            "accuracy_norm": M.accuracy_norm(scores, choices, answers)}


def _cut(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text.strip()


def _generation(task, lm, examples, shots, batch_size):
    gen_kwargs = {"until": list(task.until), "max_gen_toks": task.max_gen_toks}
    outputs = lm.generate_until([(_context(task, e, shots), dict(gen_kwargs)) for e in examples],
                                batch_size=batch_size)
    predictions = [_cut(o, task.until) for o in outputs]
    references = [e[task.fields["target"]] for e in examples]
    references = [r.strip() if isinstance(r, str) else [x.strip() for x in r] for r in references]
    result = {}
    for name, fn in (("exact_match", M.exact_match), ("f1", M.f1), ("rouge_l", M.rouge_l)):
        if name in task.metrics:
            result[name] = sum(map(fn, predictions, references)) / len(examples)
    for name, fn in (("bleu", M.bleu), ("chrf", M.chrf)):
        if name in task.metrics:
            result[name] = fn(predictions, references)
    return result


def _labels(task: Task, examples: list[dict]) -> list[str]:
    return list(task.labels) or sorted({str(e[task.fields["label"]]) for e in examples})


def _classification(task, lm, examples, shots, batch_size):
    labels = _labels(task, examples)
    golds = [str(e[task.fields["label"]]) for e in examples]
    if lm.family == "encoder":
        missing = [x for x in labels if x not in lm.labels]
        if missing:
            raise TaskNotApplicable(f"task {task.name!r} has label(s) {missing} that this "
                                    f"encoder's head does not (it has {list(lm.labels)}).")
        columns = [list(lm.labels).index(x) for x in labels]
        rows = lm.classify([str(e[task.fields["text"]]) for e in examples], batch_size=batch_size)
        scores = [[row[c] for c in columns] for row in rows]
    else:
        requests = [(_context(task, e, shots), task.target_delimiter + x)
                    for e in examples for x in labels]
        flat = [lp for lp, _ in lm.loglikelihood(requests, batch_size=batch_size)]
        scores = [flat[i:i + len(labels)] for i in range(0, len(flat), len(labels))]
    predictions = [labels[max(range(len(labels)), key=lambda j: (s[j], -j))] for s in scores]
    return {"accuracy": sum(p == g for p, g in zip(predictions, golds)) / len(golds),
            "macro_f1": M.macro_f1(predictions, golds)}


def _bias_pairs(task, lm, examples, shots, batch_size):
    del shots
    sentences = [e[c] for e in examples for c in ("sent_more", "sent_less")]
    if lm.family == "encoder":
        scores = list(lm.masked_logprob(sentences, batch_size=batch_size))
    else:
        scores = [s["logprob"] for s in lm.loglikelihood_rolling(sentences, batch_size=batch_size)]
    more, less = scores[0::2], scores[1::2]
    prefers = [float(m > x) for m, x in zip(more, less)]
    result = {"pct_stereotype": sum(prefers) / len(prefers),
              "likelihood_diff": sum(abs(m - x) for m, x in zip(more, less)) / len(prefers)}
    for bias_type in sorted({e["bias_type"] for e in examples}):
        chosen = [p for p, e in zip(prefers, examples) if e["bias_type"] == bias_type]
        result[f"pct_stereotype/{bias_type}"] = sum(chosen) / len(chosen)
    return result
