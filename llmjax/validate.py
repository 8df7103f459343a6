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
    ("eval_tasks_limit", 0),
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
    check_eval_tasks(config)
    if "hygiene" in config.data:  # an unknown or invalid data.hygiene setting: one sentence
        from llmjax.data import hygiene  # pylint: disable=g-import-not-at-top
        hygiene.HygieneConfig.from_config(config.data.hygiene)
    check_ignored_keys(config)
    paths.check_reachable(config.data.tokenizer, "data.tokenizer")
    if config.data.tokenizer and not paths.path(config.data.tokenizer).exists():
        raise FileNotFoundError(f"data.tokenizer={config.data.tokenizer!r} does not exist; give "
                                "the path of a SentencePiece .model file, or '' to train one.")
    if config.data.tokenizer:
        _check_tokenizer_file(config.data.tokenizer)
    if workdir is not None:
        paths.check_workdir(workdir)


def eval_task_names(config) -> list[str]:
    """The names (or spec paths) in config.eval_tasks, in order."""
    return [n.strip() for n in str(config.get("eval_tasks", "") or "").split(",") if n.strip()]


def check_eval_tasks(config) -> None:
    """Every eval_tasks entry names a task (llmjax/evaluation/tasks.py) this model can score."""
    names = eval_task_names(config)
    if not names:
        return
    import types

    from llmjax.evaluation import tasks  # pylint: disable=g-import-not-at-top
    num_labels = config.model.get("num_labels", 0)
    # What tasks.check_applies reads of a model: its family, labels and scoring methods.
    model = types.SimpleNamespace(
        family=config.model.get("family", "decoder"),
        labels=list(config.data.get("labels", ()) or range(num_labels)) if num_labels else None,
        masked_logprob=None)
    for name in names:
        try:
            tasks.check_applies(tasks.get(name), model)
        except ValueError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"eval_tasks={config.eval_tasks!r}: {first}") from None


# data.task -> the model family it trains (data/finetune.py reads its examples).
TASK_FAMILIES = {"lm": None, "sft": "decoder", "seq2seq": "encoder_decoder",
                 "classification": "encoder", "captions": "multimodal", "vqa": "multimodal"}


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
    if wanted == "multimodal" and family == wanted:  # the batches must have the model's shapes
        for key in ("image_size", "max_images"):
            if key in config.model and config.data.get(key) != config.model[key]:
                raise ValueError(f"data.{key}={config.data.get(key)!r} but model.{key}="
                                 f"{config.model[key]!r}; set both to the same value.")
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


# Keys that only matter for another data.name, data.task, data.objective or model.family. A key
# set away from its base_config() default where it has no effect would be silently ignored (the
# run would train on something else than the user asked for), so it is refused in one line:
# (keys, whether they apply to this config, when they apply, the setting that makes them apply).
def _lm(c):
    return c.data.get("task", "lm") == "lm"


def _shipped_task(c):
    if _lm(c):
        return False
    from llmjax.data import tasks  # pylint: disable=g-import-not-at-top
    return c.data.get("name", "") in tasks.TASKS


def _objective(name):
    return lambda c: c.data.get("objective", "causal_lm") == name


def _files_apply(c):
    return c.data.get("name", "stdlib") == "text" if _lm(c) else not _shipped_task(c)


def _files_fix(c):
    if _lm(c):
        return "set --config.data.name=text to train on them, or drop the key"
    return (f"data.name={c.data.name!r} is a task shipped with its own examples; set "
            "--config.data.name='' to read the files instead, or drop the key")


IGNORED_UNLESS = (
    (("data.files",), _files_apply,
     "data.name='text' (language modelling) or a fine-tuning data.task (sft, seq2seq, "
     "classification) without a shipped data.name", _files_fix),
    (("data.eval_files",), lambda c: not _lm(c) and not _shipped_task(c),
     "a fine-tuning data.task (sft, seq2seq, classification) reads its evaluation examples from "
     "files", lambda c: ("language modelling holds out data.validation_fraction of the documents "
                         "instead; drop the key" if _lm(c) else _files_fix(c))),
    (("data.prompt_key", "data.response_key"), lambda c: c.data.get("task") == "sft",
     "data.task='sft'", lambda c: "set --config.data.task=sft or drop the key"),
    (("data.input_key", "data.target_key", "data.target_len"),
     lambda c: c.data.get("task") == "seq2seq", "data.task='seq2seq'",
     lambda c: "set --config.data.task=seq2seq or drop the key"),
    (("data.label_key", "data.labels"), lambda c: c.data.get("task") == "classification",
     "data.task='classification'",
     lambda c: "set --config.data.task=classification (and model.num_labels) or drop the key"),
    # (A fine-tuning config made from a pretraining one keeps its objective and settings.)
    (("data.mask_rate", "data.mask_dynamic"), _objective("mlm"), "data.objective='mlm'",
     lambda c: "set --config.data.objective=mlm or drop the key"),
    (("data.noise_density", "data.mean_noise_span_length"), _objective("span_corruption"),
     "data.objective='span_corruption'",
     lambda c: "set --config.data.objective=span_corruption or drop the key"),
    (("data.infilling_rate", "data.poisson_lambda", "data.permute_sentences"),
     _objective("text_infilling"), "data.objective='text_infilling'",
     lambda c: "set --config.data.objective=text_infilling or drop the key"),
    (("data.split_train", "data.split_eval"),
     lambda c: c.data.get("name", "stdlib") not in ("stdlib", "text", "")
     and not _shipped_task(c) and not (not _lm(c) and c.data.get("files")),
     "data.name is a TFDS dataset (the local corpora and files hold out "
     "data.validation_fraction or use data.eval_files)",
     lambda c: "set --config.data.name to a prepared TFDS dataset or drop the key"),
    (("data.image_size", "data.max_images", "data.resize_images"),
     lambda c: c.data.get("task", "lm") in ("captions", "vqa"), "data.task is 'captions' or 'vqa'",
     lambda c: "set --config.data.task=captions (or vqa) or drop the key"),
    (("data.image_dir",), lambda c: c.data.get("task", "lm") in ("captions", "vqa")
     and bool(c.data.get("files") or c.data.get("eval_files")),
     "image-text JSONL files are read (data.task captions or vqa with data.files)",
     lambda c: "set data.files to the JSONL file(s) naming the images, or drop the key"),
    (("data.shapes_train", "data.shapes_validation", "data.shapes_seed"),
     lambda c: c.data.get("name", "") == "shapes", "data.name='shapes'",
     lambda c: "set --config.data.name=shapes or drop the key"),
    (("data.validation_fraction",), lambda c: c.data.get("name", "stdlib") != "prepared",
     "the corpus is split at run time (a prepared one was split when `llmjax.data.prepare` ran)",
     lambda c: "pass it to `python -m llmjax.data.prepare` instead, or drop the key"),
    (("sample.num_beams",), lambda c: c.model.get("family", "decoder") == "encoder_decoder",
     "model.family='encoder_decoder' (beam search; decoders sample with temperature, top_k, "
     "top_p)", lambda c: "drop the key (or use an encoder-decoder config)"),
    (("sample.length_penalty",), lambda c: c.sample.get("num_beams", 1) > 1,
     "beam search (sample.num_beams > 1, encoder-decoders)",
     lambda c: "set --config.sample.num_beams=4 or similar, or drop the key"),
)


def check_ignored_keys(config) -> None:
    """Refuses a key set (away from its default) where this config never reads it."""
    from llmjax.config import base_config  # pylint: disable=g-import-not-at-top
    defaults = base_config()
    for keys, applies, when, fix in IGNORED_UNLESS:
        for key in keys:
            section, name = key.split(".")
            value = config[section].get(name, defaults[section][name])
            default = defaults[section][name]
            if isinstance(value, (list, tuple)):
                value, default = tuple(value), tuple(default)
            if value != default and not applies(config):
                raise ValueError(f"{key}={value!r} only applies when {when}, so this run would "
                                 f"ignore it: {fix(config)}.")


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
