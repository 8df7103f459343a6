"""Scores a run fine-tuned on the shipped `stdlib_modules` task (llmjax/data/tasks.py builds it)
against the majority-class baseline, in the form the run was trained on:

* sft (decoders): the exact match of the greedy answer (up to eos) on the validation split;
* classification (encoders): the accuracy of the argmax label;
* seq2seq (encoder-decoders): the exact match computed by teacher forcing (the answer is right
  when every target token is the argmax given the ones before, which is exactly when greedy
  decoding would produce it and its eos).

    python -m llmjax.evaluation.stdlib_modules --workdir=DIR     # one JSON line

(`python -m llmjax.data.tasks --workdir=DIR` forwards here.) The task-agnostic evaluation of any
run, with perplexity, multiple-choice, generation, classification and bias-pair tasks, is
`python -m llmjax.evaluate` (docs/evaluation.md).
"""

from __future__ import annotations

import collections
import json

from llmjax.data import tasks


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
        paths = tasks.build(data_cfg)
        fields = TASK_FIELDS[kind][0]
        key = fields[1]  # the answer: "label" or "target"
        train, validation = read_jsonl(paths["train"], fields), read_jsonl(paths["validation"], fields)
        accuracy = teacher_forced_accuracy(run, data_cfg)
    else:
        paths = tasks.build({"name": flags.FLAGS.task, "data_dir": run.config.data.get("data_dir", "")})
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

