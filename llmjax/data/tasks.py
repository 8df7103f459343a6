"""Small labelled tasks made offline from the embedded corpus (the Python standard library).

`stdlib_modules`: which standard-library package a docstring comes from. Each function, method
or class with a docstring in one of eight packages gives one example
    {"prompt": "Docstring: <first paragraph, at most 200 chars>\\nModule:", "response": " asyncio"}
at most `PER_CLASS` per package (so no class dominates); a stable hash of the definition's
qualified name puts about 15% of them in the validation split. Fine-tuning a pretrained decoder
on it (configs/sft_stdlib_modules.py) is a classification task in generation form: the accuracy
that matters is the exact match of the greedy answer, which `python -m llmjax.data.tasks
--workdir=DIR` prints next to the majority-class baseline.

The same examples (same splits) are also written as classification JSONL
{"text": <paragraph>, "label": "asyncio"} for encoders (configs/classify_stdlib_modules.py, the
labels are `MODULES`) and as seq2seq JSONL {"input": <paragraph>, "target": "asyncio"} for
encoder-decoders (configs/seq2seq_stdlib_modules.py); `data.task` picks the form. For those
two, `python -m llmjax.data.tasks --workdir=DIR` prints the majority-class baseline next to the
accuracy (classification) or the exact match of the greedy answer computed by teacher forcing
(seq2seq: the answer is right when every target token is the argmax, which is exactly when
greedy decoding would produce it).

The JSONL files are built once into DATA_DIR/llmjax_tasks/<task>-<python>-v<N>/: train.jsonl and
validation.jsonl (sft), classification_<split>.jsonl, seq2seq_<split>.jsonl.
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


def majority_accuracy(train: list[dict], validation: list[dict], key: str = "response") -> float:
    """Accuracy on `validation` of always answering the most common training answer (`key`)."""
    majority = collections.Counter(e[key] for e in train).most_common(1)[0][0]
    return sum(e[key] == majority for e in validation) / len(validation)


def teacher_forced_accuracy(run, data_cfg) -> float:
    """Share of the validation examples of a classification or seq2seq run that are right:
    the argmax label (classification), or every target token the argmax given the ones before
    (seq2seq: exactly when greedy decoding writes the whole target and its eos)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llmjax import sharding, steps
    from llmjax.data.finetune import load_examples, make_eval_batches

    count = len(load_examples(data_cfg, "validation"))
    batch_size = 32
    batches = make_eval_batches(data_cfg, run.tokenizer, seq_len=run.config.seq_len,
                                batch_size=batch_size, num_batches=-(-count // batch_size),
                                process_index=0, process_count=1)

    @jax.jit
    def right(params, batch):  # per row: 1 if every scored target is the argmax (0 if none scored)
        logits = steps.forward(nnx.merge(run.graphdef, params), batch)
        ok = (logits.argmax(-1) == batch["targets"]) | (batch["weights"] == 0)
        return ok.all(-1) & (batch["weights"].sum(-1) > 0)

    with sharding.use_mesh(run.mesh, run.rules):
        correct = sum(int(np.sum(jax.device_get(right(run.params, {k: jnp.asarray(v)
                                                                   for k, v in b.items()}))))
                      for b in batches)
    return correct / count


def exact_match(run, examples: list[dict], batch_size: int = 64) -> float:
    """Share of examples whose greedy continuation (up to eos) is exactly the response."""
    from llmjax import sharding
    from llmjax.generate import Generator, encode_prompt
    gen = Generator(run.graphdef, run.model_cfg, mesh=run.mesh, rules=run.rules)
    longest = max(len(run.tokenizer.encode(e["response"])) for e in examples)
    correct = 0
    with sharding.use_mesh(run.mesh, run.rules):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            out = gen.generate(run.params, [encode_prompt(run.tokenizer, e["prompt"]) for e in chunk],
                               max_new_tokens=longest + 1, stop_ids=(run.tokenizer.eos_id,))
            correct += sum(run.tokenizer.decode(t) == e["response"]
                           for t, e in zip(out.tokens, chunk))
    return correct / len(examples)


def main(argv):
    from absl import flags

    from llmjax.data.finetune import TASK_FIELDS, read_jsonl
    from llmjax.generate import load_run
    from absl import logging as absl_logging
    del argv
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's restore notes are not news here
    run = load_run(flags.FLAGS.workdir)
    kind = run.config.data.get("task", "sft")
    if kind in ("classification", "seq2seq"):
        data_cfg = run.config.data.to_dict()
        data_cfg["name"] = flags.FLAGS.task
        paths = build(data_cfg)
        fields = TASK_FIELDS[kind][0]
        key = fields[1]  # the answer: "label" or "target"
        train, validation = read_jsonl(paths["train"], fields), read_jsonl(paths["validation"], fields)
        accuracy = teacher_forced_accuracy(run, data_cfg)
    else:
        paths = build({"name": flags.FLAGS.task, "data_dir": run.config.data.get("data_dir", "")})
        train, validation = read_jsonl(paths["train"]), read_jsonl(paths["validation"])
        key, accuracy = "response", exact_match(run, validation)
    result = {"task": flags.FLAGS.task, "form": kind, "workdir": flags.FLAGS.workdir,
              "step": run.step, "validation_examples": len(validation),
              "majority_class_accuracy": round(majority_accuracy(train, validation, key), 4),
              ("accuracy" if kind == "classification" else "exact_match_accuracy"):
                  round(accuracy, 4)}
    print(json.dumps(result))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("workdir", None, "A run (pretrained or fine-tuned) to evaluate.", required=True)
    flags.DEFINE_string("task", "stdlib_modules", "Which shipped task.")
    app.run(main)

