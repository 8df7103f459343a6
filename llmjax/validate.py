"""Checks on a config that need neither devices nor data, run before the workdir is touched.

Each failure is one ValueError (or FileNotFoundError) sentence naming the key, its value and the
fix. Checks that need the mesh live in `steps.validate`, those that need the data in `llmjax.data`;
the "Bad configs and data" table in docs/configs.md lists all of them, and
tests/test_bad_input.py has one test per row.
"""

from __future__ import annotations

import math

from llmjax import paths

NONFINITE_MODES = ("stop", "skip")

# (key, smallest allowed value): counts and periods that must be positive or non-negative.
_AT_LEAST = (
    ("total_steps", 1), ("batch_size", 1), ("seq_len", 1), ("microbatches", 1),
    ("log_every_steps", 1), ("eval_every_steps", 1), ("eval_steps", 1),
    ("checkpoint_every_steps", 1), ("max_to_keep", 1), ("stop_at_step", 0),
    ("model.vocab_size", 1), ("model.d_model", 1), ("model.num_layers", 1),
    ("model.num_heads", 1), ("model.mlp_dim", 1), ("model.max_len", 1),
    ("optim.warmup_steps", 0), ("sample.max_new_tokens", 0), ("sample.top_k", 0),
)


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _number(config, key: str) -> float:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}={value!r} must be a finite number; set --config.{key}.")
    return value


def validate_config(config, workdir: str | None = None) -> None:
    for key, low in _AT_LEAST:
        if _number(config, key) < low:
            raise ValueError(f"{key}={_get(config, key)!r} must be at least {low}; set "
                             f"--config.{key} to a value >= {low}.")
    for key in ("optim.learning_rate", "optim.grad_clip_norm", "optim.weight_decay",
                "sample.temperature"):
        if _number(config, key) < 0:
            raise ValueError(f"{key}={_get(config, key)!r} is negative; set --config.{key} >= 0.")
    check_sample(config.sample)
    rate = _number(config, "model.dropout_rate")
    if not 0 <= rate < 1:
        raise ValueError(f"model.dropout_rate={rate!r} must be in [0, 1); set "
                         "--config.model.dropout_rate=0.1 or similar (0 disables dropout).")
    fraction = _number(config, "data.validation_fraction")
    if not 0 < fraction < 1:
        raise ValueError(f"data.validation_fraction={fraction!r} must be strictly between 0 and 1 "
                         "(the share of documents held out for evaluation).")
    # .get: a config written before these keys existed (e.g. by an older convert) still runs.
    nonfinite = config.get("nonfinite", "stop")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE_MODES}; 'stop' "
                         "ends the run on a NaN/Inf loss or gradient, 'skip' drops that update.")
    steps = tuple(config.get("fault_nonfinite_steps", ()))
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"fault_nonfinite_steps={steps!r} must list step numbers >= 1 (steps "
                         "count from 1), e.g. --config.fault_nonfinite_steps='(5,)'.")
    _validate_task(config)
    paths.check_reachable(config.data.tokenizer, "data.tokenizer")
    if config.data.tokenizer and not paths.path(config.data.tokenizer).exists():
        raise FileNotFoundError(f"data.tokenizer={config.data.tokenizer!r} does not exist; give "
                                "the path of a SentencePiece .model file, or '' to train one.")
    if config.data.tokenizer:
        _check_tokenizer_file(config.data.tokenizer)
    if workdir is not None:
        paths.check_workdir(workdir)


# data.task -> the model family it trains (data/finetune.py reads its examples).
TASK_FAMILIES = {"lm": None, "sft": "decoder", "seq2seq": "encoder_decoder",
                 "classification": "encoder"}


def _validate_task(config) -> None:
    task = config.data.get("task", "lm")
    family = config.model.get("family", "decoder")
    num_labels = config.model.get("num_labels", 0)
    if task not in TASK_FAMILIES:
        raise ValueError(f"data.task={task!r} is not one of {tuple(TASK_FAMILIES)}.")
    if num_labels and family != "encoder":
        raise ValueError(f"model.num_labels={num_labels} adds a classification head to an encoder "
                         f"(BERT, RoBERTa), not to model.family={family!r}; set model.num_labels=0.")
    wanted = TASK_FAMILIES[task]
    if wanted and family != wanted:
        raise ValueError(f"data.task={task!r} fine-tunes model.family={wanted!r}, not {family!r}; "
                         "use a config of that family or another data.task.")
    labels = tuple(config.data.get("labels", ()))
    if task == "classification":
        if not labels:
            raise ValueError("data.task='classification' needs the label list: set data.labels, "
                             "e.g. --config.data.labels='(\"neg\", \"pos\")'.")
        if len(set(labels)) != len(labels) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"data.labels={labels!r} must be distinct strings.")
        if num_labels != len(labels):
            raise ValueError(f"model.num_labels={num_labels} but data.labels has {len(labels)} "
                             f"labels; set --config.model.num_labels={len(labels)}.")
        if config.get("sample", {}).get("max_new_tokens", 0) > 0:
            raise ValueError("a classifier (model.num_labels > 0) writes no sample after training; "
                             "set --config.sample.max_new_tokens=0.")
    elif num_labels:
        raise ValueError(f"model.num_labels={num_labels} (a classification head) needs "
                         f"data.task='classification', not {task!r}; set model.num_labels=0.")


def _check_tokenizer_file(path: str) -> None:
    import sentencepiece as spm
    try:
        spm.SentencePieceProcessor(model_proto=paths.path(path).read_bytes())
    except (RuntimeError, OSError) as e:  # SentencePiece reports a parse failure as RuntimeError
        raise ValueError(f"data.tokenizer={path!r} is not a SentencePiece model ("
                         f"{str(e).strip()[:80]}); give a .model file written by SentencePiece, "
                         "or '' to train one.") from e


def check_sample(sample) -> None:
    """The beam-search settings of a `sample` section (.get: configs saved before they existed)."""
    beams = sample.get("num_beams", 1)
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"sample.num_beams={beams!r} must be an integer >= 1 (1: greedy or "
                         "sampling); set --config.sample.num_beams=4 or similar.")
    alpha = sample.get("length_penalty", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"sample.length_penalty={alpha!r} must be a finite number (0: rank beams "
                         "by total log-probability); set --config.sample.length_penalty=0.6.")
