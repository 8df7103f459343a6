"""Supervised fine-tuning data for decoders, and starting a run from another run's parameters.

With `data.task = "sft"`, the examples are JSONL lines `{"prompt": ..., "response": ...}`:
`data.files` (train) and `data.eval_files` (evaluation), or a task shipped with llmjax named by
`data.name` (see `tasks.py`), built on first use, or a TFDS dataset prepared as array_record
named by `data.name` (features `data.prompt_key`, `data.response_key`). Each example becomes one row,
    tokens = [bos] + encode(prompt) + encode(response) + [eos],  inputs = tokens[:-1],
    targets = tokens[1:],  weights = 1 only where the target is a response token (or the eos),
so the loss and the accuracy score the response only: the model is not trained to write prompts.
Rows are padded to `seq_len` (segment 0); a longer example loses the start of its prompt (and,
if the response alone is too long, the response's end). The batches have the pretraining pipeline's format, so the same train and
eval steps run on them.

`init_from`: `restore_init(config, built, state)` replaces a freshly initialised state's
parameters with a checkpoint's (the optimizer state stays fresh, the step stays 0).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Callable

import grain
import numpy as np

from llmjax.data import pipeline

SFT_FIELDS = ("prompt", "response")


def read_jsonl(files: str, fields=SFT_FIELDS) -> list[dict[str, str]]:
    """The examples in `files` (paths or globs, comma-separated), each checked for `fields`."""
    paths = []
    for pattern in filter(None, (p.strip() for p in files.split(","))):
        hits = sorted(glob.glob(os.path.expanduser(pattern)))
        if not hits:
            raise FileNotFoundError(f"no JSONL file matches {pattern!r}; check data.files / "
                                    "data.eval_files.")
        paths += hits
    if not paths:
        raise ValueError("data.task='sft' needs JSONL files: set data.files (train) and "
                         "data.eval_files (evaluation), or data.name to a shipped task.")
    examples = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be "
                                     "one JSON object.") from None
                missing = [k for k in fields if not isinstance(record, dict) or k not in record]
                if missing:
                    raise ValueError(f"{path}:{number}: missing field {missing[0]!r}; each line must "
                                     f"be a JSON object with the fields {list(fields)}.")
                examples.append({k: str(record[k]) for k in fields})
    if not examples:
        raise ValueError(f"the JSONL files {paths} hold no examples.")
    return examples


class SftRow(grain.transforms.Map):
    """{"prompt", "response"} -> one padded row with loss weights on the response."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def map(self, example: dict[str, str]) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        prompt, response = tok.encode(example["prompt"]), tok.encode(example["response"])
        # Too long: the prompt loses its start first (what is scored survives), then the
        # response its end. A row holds seq_len + 1 tokens (inputs and targets overlap).
        keep = max(0, self.seq_len + 1 - 2 - len(response))  # room left by bos, response, eos
        prompt = [tok.bos_id] + prompt[max(0, len(prompt) - keep):]
        tokens = np.asarray(prompt + response + [tok.eos_id], np.int32)
        n = min(len(tokens) - 1, self.seq_len)
        row = {k: np.zeros(self.seq_len, np.int32) for k in pipeline._FEATURES}
        row["inputs"][:n], row["targets"][:n] = tokens[:n], tokens[1:n + 1]
        segment_ids = np.zeros(self.seq_len, np.int32)
        segment_ids[:n] = 1
        positions = np.where(segment_ids > 0, np.arange(self.seq_len), 0).astype(np.int32)
        # targets[t] = tokens[t + 1] is a response token when t + 1 >= len(prompt).
        weights = ((np.arange(self.seq_len) >= len(prompt) - 1) & (segment_ids > 0)).astype(np.int32)
        return {**row, "segment_ids": segment_ids, "positions": positions, "weights": weights}


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def load_examples(data_cfg, split: str) -> list[dict[str, str]]:
    """The {"prompt", "response"} examples of `split` ("train" or "validation"): a shipped task's
    (built on first use), the configured JSONL files, or a TFDS dataset prepared as array_record
    (`data.name`, its splits `data.split_train` / `data.split_eval`, its features
    `data.prompt_key` / `data.response_key`)."""
    from llmjax.data import corpus, tasks
    name = data_cfg.get("name", "")
    if name in tasks.TASKS:
        return read_jsonl(tasks.build(data_cfg)[split])
    files = data_cfg.get("files", "") if split == "train" else data_cfg.get("eval_files", "")
    if files or name in corpus.LOCAL_CORPORA or not name:
        return read_jsonl(files)
    tfds_split = data_cfg.get("split_train" if split == "train" else "split_eval", split)
    source = corpus.load_split(data_cfg, tfds_split)
    keys = data_cfg.get("prompt_key", "prompt"), data_cfg.get("response_key", "response")
    examples = []
    for i in range(len(source)):
        record = source.record(i)
        missing = [k for k in keys if k not in record]
        if missing:
            raise ValueError(f"TFDS dataset {name!r} ({tfds_split}) example {i} has no feature "
                             f"{missing[0]!r} (it has {sorted(record)}); set data.prompt_key and "
                             "data.response_key.")
        examples.append({field: (record[k].decode("utf-8", errors="replace")
                                 if isinstance(record[k], bytes) else str(record[k]))
                         for field, k in zip(SFT_FIELDS, keys)})
    return examples


def make_train_iterator(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        process_index=None, process_count=None, workdir=None):
    """Endless, shuffled (a new order every epoch), checkpointable batches of SFT rows."""
    del workdir
    process_index, process_count = pipeline._process(process_index, process_count)
    rows = pipeline._rows_per_process(batch_size, process_count)
    examples = load_examples(data_cfg, "train")
    ds = grain.MapDataset.source(examples)
    ds = pipeline._shard(ds, process_index, process_count, "train", strict=True)
    ds = ds.shuffle(seed).repeat().map(SftRow(tokenizer, seq_len)).batch(rows, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def make_eval_batches(data_cfg, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                      process_index=None, process_count=None) -> list[dict[str, np.ndarray]]:
    """The evaluation examples in file order, at most `num_batches` batches; the last batch is
    filled with empty rows (weight 0), so every example counts exactly once."""
    process_index, process_count = pipeline._process(process_index, process_count)
    rows = pipeline._rows_per_process(batch_size, process_count)
    examples = load_examples(data_cfg, "validation")[:num_batches * batch_size]
    mine = examples[process_index::process_count]
    to_row = SftRow(tokenizer, seq_len)
    out = [to_row.map(e) for e in mine]
    empty = {k: np.zeros_like(v) for k, v in out[0].items()}
    # Every process must run the same number of eval steps.
    per_process = -(-len(examples) // process_count)
    out += [empty] * (-(-per_process // rows) * rows - len(out))
    return [_stack(out[i:i + rows]) for i in range(0, len(out), rows)]


def pipeline_for(data_cfg) -> tuple[Callable, Callable]:
    """(make_train_iterator, make_eval_batches) for `data.task`."""
    task = data_cfg.get("task", "lm")
    if task == "lm":
        return pipeline.make_train_iterator, pipeline.make_eval_batches
    if task == "sft":
        return make_train_iterator, make_eval_batches
    raise ValueError(f"data.task={task!r} is not one of 'lm', 'sft'.")


def adopt_tokenizer(config, workdir: str) -> None:
    """Copies the `init_from` run's tokenizer.model into `workdir` (when no data.tokenizer is set
    and the workdir has none): the fine-tuned model must read text exactly as it was pretrained
    to, and the copy keeps the fine-tuned workdir self-contained for `llmjax.generate`."""
    if not config.get("init_from") or config.data.get("tokenizer"):
        return
    from llmjax.checkpoint import resolve
    directory, _ = resolve(config.init_from)
    source = os.path.join(os.fspath(directory.parent), "tokenizer.model")
    target = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(source) and not os.path.exists(target):
        os.makedirs(workdir, exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)  # atomic: every host may copy, a reader never sees half a file


def restore_init(config, built, state: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """`state` with its parameters replaced by those of the `init_from` checkpoint (same
    shardings); the fresh optimizer state and step 0 stay. Returns (state, checkpoint step)."""
    from llmjax.checkpoint import resolve, restore_params
    from llmjax.checkpoint import saved_config
    from llmjax.train import check_same_model

    saved, _ = saved_config(config.init_from)
    directory, step = resolve(config.init_from)
    check_same_model(saved, config, f"{directory / str(step)} (init_from)")
    params, _, step = restore_params(config.init_from, built.abstract_state["params"])
    return {**state, "params": params}, step
