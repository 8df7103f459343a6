"""Small labelled tasks made offline from the embedded corpus (the Python standard library).

`stdlib_modules`: which standard-library package a docstring comes from. Each function, method
or class with a docstring in one of eight packages gives one example
    {"prompt": "Docstring: <first paragraph, at most 200 chars>\\nModule:", "response": " asyncio"}
at most `PER_CLASS` per package (so no class dominates); a stable hash of the definition's
qualified name puts about 15% of them in the validation split. Fine-tuning a pretrained decoder
on it (configs/sft_stdlib_modules.py) is a classification task in generation form.

The same examples (same splits) are also written as classification JSONL
{"text": <paragraph>, "label": "asyncio"} for encoders (configs/classify_stdlib_modules.py, the
labels are `MODULES`) and as seq2seq JSONL {"input": <paragraph>, "target": "asyncio"} for
encoder-decoders (configs/seq2seq_stdlib_modules.py); `data.task` picks the form. Scoring a
fine-tuned run on it is `python -m llmjax.evaluation.stdlib_modules --workdir=DIR`
(llmjax/evaluation/stdlib_modules.py); this package only builds the examples.

The JSONL files are built once into DATA_DIR/llmjax_tasks/<task>-<python>-v<N>/: train.jsonl and
validation.jsonl (sft), classification_<split>.jsonl, seq2seq_<split>.jsonl.

For the evaluation tasks (llmjax/evaluation/task_files/) this module also lists the held-out
documents of the default corpus (`held_out_documents`: never trained on) and the documented
definitions inside them (`held_out_definitions`: docstring, name and three other names).
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import sys

from llmjax.data import documents

MODULES = ("asyncio", "email", "http", "logging", "multiprocessing", "tarfile", "tkinter",
           "unittest")
PER_CLASS = 200
VALIDATION_FRACTION = 0.15
_VERSION = 1
TASKS = ("stdlib_modules",)


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


# data.task -> how an example (docstring paragraph, package) is written, and its file prefix.
FORMS = {
    "sft": (lambda text, module: {"prompt": f"Docstring: {text}\nModule:", "response": f" {module}"},
            ""),
    "classification": (lambda text, module: {"text": text, "label": module}, "classification_"),
    "seq2seq": (lambda text, module: {"input": text, "target": module}, "seq2seq_"),
}


def stdlib_module_examples(modules=MODULES, per_class: int = PER_CLASS,
                           form: str = "sft") -> dict[str, list[dict]]:
    """{"train": [...], "validation": [...]} examples for `modules`, deterministic; `form` is a
    key of FORMS (the splits are the same for every form)."""
    return _write(_labelled_paragraphs(modules, per_class), form)


def _write(labelled: dict[str, list[tuple[str, str]]], form: str) -> dict[str, list[dict]]:
    write = FORMS[form][0]
    return {split: [write(text, module) for text, module in pairs]
            for split, pairs in labelled.items()}


def _labelled_paragraphs(modules, per_class: int) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(paragraph, package), ...], "validation": [...]}."""
    by_module = collections.defaultdict(list)
    for doc in documents.stdlib_documents():
        top = doc.path.split("/")[0].removesuffix(".py")
        if doc.file is None or top not in modules:
            continue
        try:
            tree = ast.parse(doc.read())
        except SyntaxError:  # a file for another Python version (lib2to3 fixtures and the like)
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            text = ast.get_docstring(node) or ""
            paragraph = " ".join(text.split("\n\n")[0].split())[:200]
            if len(paragraph) >= 20:
                by_module[top].append((f"{doc.path}:{node.lineno}:{node.name}", paragraph))
    splits = {"train": [], "validation": []}
    for module in modules:
        # Sorting by a hash spreads the kept examples over the whole package.
        kept = sorted(by_module[module], key=lambda e: _unit_hash(e[0]))[:per_class]
        for name, paragraph in sorted(kept):
            example = (paragraph, module)
            split = "validation" if _unit_hash("split:" + name) < VALIDATION_FRACTION else "train"
            splits[split].append(example)
    return splits


def build(data_cfg) -> dict[str, str]:
    """Writes the task's JSONL files (once, every form) and returns {"train": path,
    "validation": path} of the form `data.task` reads (sft for any task not in FORMS)."""
    from llmjax.data.corpus import resolve_data_dir
    name = data_cfg.get("name", "")
    if name not in TASKS:
        raise ValueError(f"data.name={name!r} is not a shipped task; choose one of {TASKS}.")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    directory = os.path.join(resolve_data_dir(data_cfg), "llmjax_tasks", f"{name}-{tag}-v{_VERSION}")
    paths = {form: {s: os.path.join(directory, f"{prefix}{s}.jsonl") for s in ("train", "validation")}
             for form, (_, prefix) in FORMS.items()}
    if not all(os.path.exists(p) for split in paths.values() for p in split.values()):
        os.makedirs(directory, exist_ok=True)
        labelled = _labelled_paragraphs(MODULES, PER_CLASS)
        for form in FORMS:
            for split, examples in _write(labelled, form).items():
                tmp = f"{paths[form][split]}.tmp{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(e) + "\n" for e in examples)
                os.replace(tmp, paths[form][split])  # atomic: a reader never sees half a file
    task = data_cfg.get("task", "sft")
    return paths[task if task in FORMS else "sft"]


# The default corpus's validation_fraction: a document whose path hash is below it is held out
# of training by every run with that fraction or a larger one (the split is a threshold).
HELD_OUT_FRACTION = 0.02


def held_out_documents(fraction: float = HELD_OUT_FRACTION, max_bytes: int = 12_000) -> list[dict]:
    """[{"path", "text"}] of the default corpus's held-out documents (`documents.held_out`), the
    non-empty ones of at most `max_bytes` (a few dozen kB in all: a quick perplexity check)."""
    docs = documents.stdlib_documents()
    chosen = documents.held_out(docs, fraction)
    out = []
    for doc in docs:
        if doc.path in chosen and 0 < doc.size <= max_bytes:
            text = doc.read()
            if text.strip():
                out.append({"path": doc.path, "text": text})
    return out


def held_out_definitions(fraction: float = HELD_OUT_FRACTION, num_choices: int = 4) -> list[dict]:
    """One record per public documented function or class of the held-out source documents:
    {"docstring": first paragraph (at most 200 chars), "name", "path", "choices": the name and
    `num_choices - 1` other names of the set, "answer": the name's index}; deterministic (stable
    hashes choose the other names and the answer's place)."""
    docs = documents.stdlib_documents()
    chosen = documents.held_out(docs, fraction)
    found: dict[str, tuple[str, str]] = {}
    for doc in docs:
        if doc.path not in chosen or doc.file is None:
            continue
        try:
            tree = ast.parse(doc.read())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and not node.name.startswith("_") and node.name not in found):
                text = ast.get_docstring(node) or ""
                paragraph = " ".join(text.split("\n\n")[0].split())[:200]
                if len(paragraph) >= 20:
                    found[node.name] = (doc.path, paragraph)
    names = sorted(found)
    records = []
    for name in names:
        others = sorted((n for n in names if n != name), key=lambda n: _unit_hash(f"{name}>{n}"))
        choices = others[:num_choices - 1]
        answer = int(_unit_hash("answer:" + name) * num_choices)
        choices.insert(answer, name)
        path, paragraph = found[name]
        records.append({"docstring": paragraph, "name": name, "path": path, "choices": choices,
                        "answer": answer})
    return records


if __name__ == "__main__":
    # The scoring moved to llmjax/evaluation/stdlib_modules.py; the old command still works.
    import runpy
    runpy.run_module("llmjax.evaluation.stdlib_modules", run_name="__main__", alter_sys=True)
