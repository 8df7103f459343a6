"""Evaluate a model on tasks: perplexity, multiple choice, generation, classification and bias
pairs (llmjax/evaluation/tasks.py; docs/evaluation.md).

    python -m llmjax.evaluate --workdir=runs/gpt_small_local --tasks=stdlib_docs_ppl,py2to3
    python -m llmjax.evaluate --workdir=hf_model_dir --tasks=my_task.yaml --limit=100
    python -m llmjax.evaluate --tasks=list          # the shipped tasks, their kind and size

The workdir is an llmjax run or a Hugging Face model directory (`LM.from_workdir`). Prints one
table (task, metric, value, n), then one JSON line per task; `--output=FILE.json` also writes
them as a list. Every task is loaded and checked against the model's family before any is run,
so a typo in the last one costs no time; a mistake is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from llmjax import cli

flags.DEFINE_string("workdir", None, "An llmjax run or a Hugging Face model directory.")
flags.DEFINE_string("tasks", None, "Comma-separated shipped task names or spec paths "
                    "(.yaml/.json); 'list' lists the shipped tasks.")
flags.DEFINE_integer("limit", None, "Score only the first N examples of each task.")
flags.DEFINE_integer("batch_size", 16, "Requests per model call.")
flags.DEFINE_string("output", None, "Also write the results (a JSON list) to this file.")

FLAGS = flags.FLAGS


def list_tasks() -> list[dict]:
    """[{"task", "kind", "examples", "description"}] of the shipped tasks."""
    from llmjax.evaluation import tasks
    rows = []
    for name in tasks.shipped():
        task = tasks.get(name)
        rows.append({"task": name, "kind": task.kind, "examples": len(task.examples()),
                     "description": task.description})
    return rows


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _value(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def evaluate(lm, task_list, limit=None, batch_size=16) -> list[dict]:
    """Runs each task: [{"task", "kind", "step" (the model's), metric: value, ..., "n"}]."""
    from llmjax.evaluation import tasks
    results = []
    for task in task_list:
        scores = tasks.run(task, lm, limit=limit, batch_size=batch_size)
        results.append({"task": task.name, "kind": task.kind, "step": lm.step, **scores})
    return results


def _first_line(error: BaseException) -> str:
    lines = [x.strip() for x in str(error).strip().splitlines() if x.strip()]
    return lines[0] if lines else repr(error)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags look like --tasks=NAME.")
    from llmjax.evaluation import tasks
    if not FLAGS.tasks:
        cli.fail("--tasks is required: shipped names or spec paths separated by commas "
                 "(--tasks=list shows the shipped ones).")
    if FLAGS.tasks == "list":
        rows = list_tasks()
        print(table([["task", "kind", "examples", "description"]] +
                    [[r["task"], r["kind"], str(r["examples"]), r["description"]] for r in rows]))
        return
    if FLAGS.limit is not None and FLAGS.limit < 1:
        cli.fail(f"--limit={FLAGS.limit} must be at least 1.")
    if FLAGS.batch_size < 1:
        cli.fail(f"--batch_size={FLAGS.batch_size} must be at least 1.")
    if not FLAGS.workdir:
        cli.fail("--workdir is required: an llmjax run or a Hugging Face model directory.")
    try:
        task_list = [tasks.get(n.strip()) for n in FLAGS.tasks.split(",") if n.strip()]
        for task in task_list:  # every data file parses before the model loads
            task.examples()
    except ValueError as e:
        cli.fail(_first_line(e))
    from llmjax import paths
    if not paths.path(FLAGS.workdir).exists():
        cli.fail(f"--workdir={FLAGS.workdir} does not exist; give an llmjax run or a Hugging "
                 "Face model directory.")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's restore notes are not news here
    from llmjax.evaluation.lm import LM
    try:
        lm = LM.from_workdir(FLAGS.workdir)
        for task in task_list:  # applies to this family, fields present: before any scoring
            tasks.prepare(task, lm, FLAGS.limit)
        results = evaluate(lm, task_list, FLAGS.limit, FLAGS.batch_size)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(_first_line(e))
    rows = [["task", "metric", "value", "n"]]
    for r in results:
        rows += [[r["task"], k, _value(v), str(r["n"])] for k, v in r.items()
                 if k not in ("task", "kind", "step", "n")]
    print(table(rows))
    for r in results:
        print(json.dumps(r))
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
