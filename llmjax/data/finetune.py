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

With `data.task = "seq2seq"` (T5, BART), the lines are `{"input": ..., "target": ...}` and each
example becomes one encoder-decoder row (the batch keys of `steps.batch_keys`):
    inputs = start + encode(input) + [eos]  (start: [bos], or nothing under T5's span corruption
             as in pretraining and decoding; padded to seq_len; a longer input loses its end),
    targets = encode(target) + [eos],  decoder_inputs = [bos] + encode(target)  (padded to
    data.target_len, 0: seq_len; a longer target loses its end but keeps the eos; the decoder
    starts from pad instead of bos under T5's conventions, objectives.decoder_start_id),
    weights = 1 on every target token and the eos, segment ids 1 (0 on padding), positions 0...
With `data.task = "classification"` (BERT, RoBERTa with `model.num_labels`), the lines are
`{"text": ..., "label": ...}`; labels are strings, mapped to ids by their index in `data.labels`
(saved with the run's config; a label not in it is an error naming the file and line):
    inputs = [bos] + encode(text) + [eos]  (the bos is the [CLS] token the head reads; a longer
    text loses its end), targets = [[label id]], weights = [[1]]  (0 for an empty padding row),
so the loss and the accuracy are per example. The JSON keys (and TFDS features) are
`data.input_key` / `data.target_key` and `data.text_key` / `data.label_key`.

`init_from`: `restore_init(config, built, state)` replaces a freshly initialised state's
parameters with a checkpoint's (the optimizer state stays fresh, the step stays 0). A
classification model started from a masked-LM checkpoint takes its backbone (embeddings,
layers, pooler) and keeps its new head's fresh initialisation; the MLM head stays on disk.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import grain
import numpy as np

from llmjax import paths
from llmjax.data import pipeline

SFT_FIELDS = ("prompt", "response")
# data.task -> (the example's fields, the config keys naming their JSON keys / TFDS features).
TASK_FIELDS = {"sft": (SFT_FIELDS, ("prompt_key", "response_key")),
               "seq2seq": (("input", "target"), ("input_key", "target_key")),
               "classification": (("text", "label"), ("text_key", "label_key"))}


def _unknown_label(where: str, label: str, labels) -> ValueError:
    return ValueError(f"{where}: label {label!r} is not in data.labels {list(labels)}; add it "
                      "there (and raise model.num_labels) or fix the example.")


def read_jsonl(files: str, fields=SFT_FIELDS, keys=None, labels=None) -> list[dict[str, str]]:
    """The examples in `files` (paths or globs, comma-separated), each checked for `fields`
    (read from the JSON keys `keys`, default the field names). With `labels`, the second field
    must be one of them."""
    keys = tuple(keys or fields)
    paths = []
    for pattern in filter(None, (p.strip() for p in files.split(","))):
        hits = sorted(glob.glob(os.path.expanduser(pattern)))
        if not hits:
            raise FileNotFoundError(f"no JSONL file matches {pattern!r}; check data.files / "
                                    "data.eval_files.")
        paths += hits
    if not paths:
        raise ValueError("a fine-tuning data.task needs JSONL files: set data.files (train) and "
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
                missing = [k for k in keys if not isinstance(record, dict) or k not in record]
                if missing:
                    raise ValueError(f"{path}:{number}: missing field {missing[0]!r}; each line must "
                                     f"be a JSON object with the fields {list(keys)}.")
                example = {f: str(record[k]) for f, k in zip(fields, keys)}
                if labels is not None and example[fields[1]] not in labels:
                    raise _unknown_label(f"{path}:{number}", example[fields[1]], labels)
                examples.append(example)
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


class Seq2SeqRow(grain.transforms.Map):
    """{"input", "target"} -> one padded encoder-decoder row scored on the target (and its eos)."""

    def __init__(self, tokenizer, seq_len: int, target_len: int, start_id: int, prefix=()):
        self.tokenizer, self.seq_len, self.target_len = tokenizer, seq_len, target_len
        self.start_id = start_id  # bos, or pad under T5's conventions (as pretraining and decoding)
        self.prefix = list(prefix)  # the encoder's first ids: [bos] for BART, none for T5

    def map(self, example: dict[str, str]) -> dict[str, np.ndarray]:
        from llmjax.data.objectives import _encoder_decoder_example
        tok = self.tokenizer
        # Too long: the input and the target lose their ends; both keep their eos.
        inputs = (self.prefix + tok.encode(example["input"]))[:self.seq_len - 1] + [tok.eos_id]
        targets = tok.encode(example["target"])[:self.target_len - 1] + [tok.eos_id]
        return _encoder_decoder_example(np.asarray(inputs, np.int32), np.asarray(targets, np.int32),
                                        seq_len=self.seq_len, target_len=self.target_len,
                                        start_id=self.start_id)


class ClassificationRow(grain.transforms.Map):
    """{"text", "label"} -> [bos] + text + [eos] (padded) and the label's id as a [1] target."""

    def __init__(self, tokenizer, seq_len: int, labels):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.ids = {label: i for i, label in enumerate(labels)}

    def map(self, example: dict[str, str]) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        # Too long: the text loses its end (the first token, which the head reads, stays).
        tokens = [tok.bos_id] + tok.encode(example["text"])[:max(0, self.seq_len - 2)] + [tok.eos_id]
        tokens = tokens[:self.seq_len]
        n = len(tokens)
        inputs = np.zeros(self.seq_len, np.int32)
        inputs[:n] = tokens
        segment_ids = (np.arange(self.seq_len) < n).astype(np.int32)
        return {"inputs": inputs, "segment_ids": segment_ids,
                "positions": np.where(segment_ids > 0, np.arange(self.seq_len), 0).astype(np.int32),
                "targets": np.asarray([self.ids[example["label"]]], np.int32),
                "weights": np.ones(1, np.int32)}


def row_maker(data_cfg, tokenizer, seq_len: int) -> grain.transforms.Map:
    """The transformation from an example of `data.task` to one row of the model's batch."""
    task = data_cfg.get("task", "sft")
    if task == "seq2seq":
        from llmjax.data.objectives import decoder_start_id, encoder_start_ids
        return Seq2SeqRow(tokenizer, seq_len, int(data_cfg.get("target_len", 0)) or seq_len,
                          decoder_start_id(data_cfg, tokenizer),
                          encoder_start_ids(data_cfg, tokenizer))
    if task == "classification":
        return ClassificationRow(tokenizer, seq_len, tuple(data_cfg.get("labels", ())))
    return SftRow(tokenizer, seq_len)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def load_examples(data_cfg, split: str) -> list[dict[str, str]]:
    """The examples of `split` ("train" or "validation") for `data.task` (sft: {"prompt",
    "response"}, seq2seq: {"input", "target"}, classification: {"text", "label"}): a shipped
    task's (built on first use), the configured JSONL files, or a TFDS dataset prepared as
    array_record (`data.name`, its splits `data.split_train` / `data.split_eval`, its features
    named by the task's keys, e.g. `data.prompt_key` / `data.response_key`)."""
    from llmjax.data import corpus, tasks
    fields, key_names = TASK_FIELDS.get(data_cfg.get("task", "sft"), TASK_FIELDS["sft"])
    keys = tuple(data_cfg.get(k, f) for k, f in zip(key_names, fields))
    labels = (tuple(data_cfg.get("labels", ())) if data_cfg.get("task") == "classification"
              else None)
    name = data_cfg.get("name", "")
    if name in tasks.TASKS:
        return read_jsonl(tasks.build(data_cfg)[split], fields, labels=labels)
    files = data_cfg.get("files", "") if split == "train" else data_cfg.get("eval_files", "")
    if files or name in corpus.LOCAL_CORPORA or not name:
        return read_jsonl(files, fields, keys, labels)
    tfds_split = data_cfg.get("split_train" if split == "train" else "split_eval", split)
    source = corpus.load_split(data_cfg, tfds_split)
    examples = []
    for i in range(len(source)):
        record = source.record(i)
        missing = [k for k in keys if k not in record]
        if missing:
            raise ValueError(f"TFDS dataset {name!r} ({tfds_split}) example {i} has no feature "
                             f"{missing[0]!r} (it has {sorted(record)}); set data.{key_names[0]} "
                             f"and data.{key_names[1]}.")
        example = {field: (record[k].decode("utf-8", errors="replace")
                           if isinstance(record[k], bytes) else str(record[k]))
                   for field, k in zip(fields, keys)}
        if labels is not None and example[fields[1]] not in labels:
            raise _unknown_label(f"TFDS dataset {name!r} ({tfds_split}) example {i}",
                                 example[fields[1]], labels)
        examples.append(example)
    return examples


def make_train_iterator(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        process_index=None, process_count=None, workdir=None):
    """Endless, shuffled (a new order every epoch), checkpointable batches of `data.task` rows."""
    del workdir
    process_index, process_count = pipeline._process(process_index, process_count)
    rows = pipeline._rows_per_process(batch_size, process_count)
    examples = load_examples(data_cfg, "train")
    ds = grain.MapDataset.source(examples)
    ds = pipeline._shard(ds, process_index, process_count, "train", strict=True)
    ds = ds.shuffle(seed).repeat().map(row_maker(data_cfg, tokenizer, seq_len))
    ds = ds.batch(rows, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def make_eval_batches(data_cfg, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                      process_index=None, process_count=None) -> list[dict[str, np.ndarray]]:
    """The evaluation examples in file order, at most `num_batches` batches; the last batch is
    filled with empty rows (weight 0), so every example counts exactly once."""
    process_index, process_count = pipeline._process(process_index, process_count)
    rows = pipeline._rows_per_process(batch_size, process_count)
    examples = load_examples(data_cfg, "validation")[:num_batches * batch_size]
    mine = examples[process_index::process_count]
    to_row = row_maker(data_cfg, tokenizer, seq_len)
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
    if task in TASK_FIELDS:
        return make_train_iterator, make_eval_batches
    from llmjax.data import image_pipeline  # images: captions | vqa
    if task in image_pipeline.TASKS:
        return image_pipeline.make_train_iterator, image_pipeline.make_eval_batches
    raise ValueError(f"data.task={task!r} is not one of {('lm', *TASK_FIELDS, *image_pipeline.TASKS)}.")


def tokenizer_data(data_cfg):
    """The data section a new tokenizer is trained from: for a shipped task (`data.name`), the
    corpus it is made from (the standard library), so a run from scratch needs no data.tokenizer."""
    from llmjax.data import image_pipeline, tasks
    if data_cfg.get("task", "lm") in image_pipeline.TASKS:  # the image examples' texts
        return image_pipeline.tokenizer_data(data_cfg)
    if data_cfg.get("name", "") not in tasks.TASKS:
        return data_cfg
    source = data_cfg.copy_and_resolve_references()
    with source.unlocked():
        source.name = "stdlib"
    return source


def adopt_tokenizer(config, workdir: str) -> None:
    """Copies the `init_from` run's tokenizer.model into `workdir` (when no data.tokenizer is set
    and the workdir has none): the fine-tuned model must read text exactly as it was pretrained
    to, and the copy keeps the fine-tuned workdir self-contained for `llmjax.generate`."""
    if not config.get("init_from") or config.data.get("tokenizer"):
        return
    from llmjax.checkpoint import resolve
    directory, _ = resolve(config.init_from)
    source = directory.parent / "tokenizer.model"
    target = paths.path(workdir) / "tokenizer.model"
    if source.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
        source.copy(tmp)
        tmp.replace(target)  # atomic: every host may copy, a reader never sees half a file


def restore_init(config, built, state: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """`state` with its parameters replaced by those of the `init_from` checkpoint (same
    shardings); the fresh optimizer state and step 0 stay. Returns (state, checkpoint step)."""
    from llmjax.checkpoint import resolve, restore_params
    from llmjax.checkpoint import saved_config
    from llmjax.checkpoint import check_same_model

    saved, _ = saved_config(config.init_from)
    directory, step = resolve(config.init_from)
    check_same_model(saved, config, f"{directory / str(step)} (init_from)", fine_tuning=True)
    target = built.abstract_state["params"]
    new_head = config.model.get("num_labels", 0) and not saved.get("model", {}).get("num_labels", 0)
    if new_head:  # a classifier from a checkpoint without one: its head stays freshly initialised
        target = {k: v for k, v in target.items() if k != "classifier"}
    params, _, step = restore_params(config.init_from, target)
    return {**state, "params": {**state["params"], **params}}, step
