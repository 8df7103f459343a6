"""Fine-tuning encoders and encoder-decoders: seq2seq rows score only the target, classification
rows carry one label id, the head's loss and accuracy match numpy, init_from an MLM checkpoint
loads the backbone and creates the head, freezing freezes, 8 devices = 1 device, short runs
beat the majority class, and bad input stops with one line."""


import jax
import numpy as np
import pytest

from llmjax import sharding, steps
from llmjax.checkpoint import Checkpointer
from llmjax.data import finetune, tasks
from llmjax.evaluation import stdlib_modules
from llmjax.validate import validate_config

import family_helpers as fh
import model_reference
from test_finetune import CharTokenizer, build, write_jsonl

LABELS = ("neg", "pos", "odd")


def seq2seq_config(**overrides):
    return fh.tiny_train_config("t5", **{"data.task": "seq2seq", "data.target_len": 8,
                                         **overrides})


def classify_config(style="bert", **overrides):
    return fh.tiny_train_config(style, **{"data.task": "classification", "data.labels": LABELS,
                                          "model.num_labels": len(LABELS), **overrides})


def test_seq2seq_rows_score_only_the_target(tmp_path):
    files = write_jsonl(tmp_path / "s.jsonl", [{"in": "abc", "out": "xy"},
                                               {"in": "a much longer input", "out": "long target"}])
    tok = CharTokenizer()
    cfg = seq2seq_config(**{"data.files": files, "data.eval_files": files, "data.input_key": "in",
                            "data.target_key": "out"}).data
    short, long = finetune.load_examples(cfg, "train")
    assert short == {"input": "abc", "target": "xy"}
    row = finetune.row_maker(cfg, tok, seq_len=6).map(short)
    np.testing.assert_array_equal(row["inputs"], tok.encode("abc") + [2, 0, 0])  # + eos, padding
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 0])
    # decoder_inputs = bos + target; targets = target + eos; only those three scored.
    np.testing.assert_array_equal(row["decoder_inputs"], [1] + tok.encode("xy") + [0] * 5)
    np.testing.assert_array_equal(row["targets"], tok.encode("xy") + [2] + [0] * 5)
    np.testing.assert_array_equal(row["weights"], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["decoder_segment_ids"], row["weights"])
    np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 2, 0, 0, 0, 0, 0])
    # BART's encoder reads a bos first, as in its pretraining and in decoding; T5's reads none.
    bart = fh.tiny_train_config("bart", **{"data.task": "seq2seq", "data.target_len": 8,
                                           "data.objective": "text_infilling"}).data
    np.testing.assert_array_equal(finetune.row_maker(bart, tok, seq_len=6).map(short)["inputs"],
                                  [1] + tok.encode("abc") + [2, 0])
    # Too long: both sides lose their ends and keep the eos.
    cut = finetune.row_maker(cfg, tok, seq_len=6).map(long)
    np.testing.assert_array_equal(cut["inputs"], tok.encode("a muc") + [2])
    np.testing.assert_array_equal(cut["targets"], tok.encode("long ta") + [2])
    np.testing.assert_array_equal(cut["decoder_inputs"], [1] + tok.encode("long ta"))

    batch = next(finetune.make_train_iterator(cfg, tok, seq_len=6, batch_size=2, seed=0,
                                              process_index=0, process_count=1))
    config = seq2seq_config(seq_len=6, batch_size=2)
    shapes = steps.batch_shapes(config)
    assert set(batch) == set(steps.batch_keys(steps.ModelConfig.from_config(config.model)))
    assert all(batch[k].shape == shapes[k] for k in batch), {k: v.shape for k, v in batch.items()}
    evals = finetune.make_eval_batches(cfg, tok, seq_len=6, batch_size=4, num_batches=3,
                                       process_index=0, process_count=1)
    assert len(evals) == 1 and evals[0]["weights"].sum() == 3 + 8  # 2 examples, 2 empty rows


def test_classification_rows_and_label_mapping(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"},
                                                   {"text": "bad", "label": "neg"},
                                                   {"text": "a long text indeed", "label": "odd"}])
    tok = CharTokenizer()
    cfg = classify_config(**{"data.files": train, "data.eval_files": train}).data
    examples = finetune.load_examples(cfg, "train")
    rows = [finetune.row_maker(cfg, tok, seq_len=8).map(e) for e in examples]
    assert [int(r["targets"][0]) for r in rows] == [1, 0, 2]  # the index in data.labels
    assert all(r["weights"].tolist() == [1] for r in rows)
    np.testing.assert_array_equal(rows[0]["inputs"], [1] + tok.encode("good") + [2, 0, 0])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(rows[2]["inputs"], [1] + tok.encode("a long") + [2])  # cut end
    evals = finetune.make_eval_batches(cfg, tok, seq_len=8, batch_size=4, num_batches=2,
                                       process_index=0, process_count=1)
    shapes = steps.batch_shapes(classify_config(seq_len=8, batch_size=4))
    assert shapes["targets"] == shapes["weights"] == (4, 1) and shapes["inputs"] == (4, 8)
    assert all(evals[0][k].shape == shapes[k] for k in shapes)
    np.testing.assert_array_equal(evals[0]["weights"], [[1], [1], [1], [0]])  # an empty row

    # A label the list does not have (here in the eval file): one line with the file and line.
    evalfile = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "pos"},
                                                     {"text": "y", "label": "maybe"}])
    cfg = classify_config(**{"data.files": train, "data.eval_files": evalfile}).data
    with pytest.raises(ValueError, match=r"eval.jsonl:2: label 'maybe' is not in data.labels "
                                         r"\['neg', 'pos', 'odd'\]; add it there") as e:
        finetune.make_eval_batches(cfg, tok, seq_len=8, batch_size=4, num_batches=1,
                                   process_index=0, process_count=1)
    assert "\n" not in str(e.value)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "a", "target": "b"}, "",
                                               {"input": "c", "targ": "d"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'target'"):
        finetune.load_examples(seq2seq_config(**{"data.files": bad}).data, "train")
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: missing field 'label'"):
        finetune.load_examples(classify_config(**{"data.files": bad}).data, "train")


@pytest.mark.parametrize("overrides, message", [
    ({"data.labels": (), "model.num_labels": 0}, "needs the label list: set data.labels"),
    ({"data.labels": ("a", "a"), "model.num_labels": 2}, "must be distinct strings"),
    ({"model.num_labels": 2}, r"model.num_labels=2 but data.labels has 3 labels; set "
                              r"--config.model.num_labels=3"),
    ({"data.task": "lm"}, r"model.num_labels=3 \(a classification head\) needs "
                          r"data.task='classification'"),
    ({"sample.max_new_tokens": 4}, r"a classifier \(model.num_labels > 0\) writes no sample"),
])
def test_bad_classification_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(classify_config(**overrides))


def test_num_labels_on_a_decoder_and_tasks_on_the_wrong_family():
    from tests.helpers import tiny_config
    with pytest.raises(ValueError, match=r"model.num_labels=3 adds a classification head to an "
                                         r"encoder \(BERT, RoBERTa\), not to model.family='decoder'"):
        validate_config(tiny_config(**{"model.num_labels": 3}))
    with pytest.raises(ValueError, match="model.num_labels=3 belongs to the encoder family"):
        steps.ModelConfig.from_config(tiny_config(**{"model.num_labels": 3}).model)
    with pytest.raises(ValueError, match="data.task='seq2seq' fine-tunes "
                                         "model.family='encoder_decoder', not 'encoder'"):
        validate_config(fh.tiny_train_config("bert", **{"data.task": "seq2seq"}))
    with pytest.raises(ValueError, match="data.task='nope' is not one of"):
        validate_config(fh.tiny_train_config("bert", **{"data.task": "nope"}))


def test_classification_loss_and_accuracy_match_numpy():
    config = classify_config(batch_size=4, seq_len=12)
    cfg = steps.ModelConfig.from_config(config.model)
    model, params = fh.make(cfg)
    assert "classifier" in params and not any(k.startswith("mlm") for k in params)
    rng = np.random.default_rng(0)
    lengths = np.array([12, 9, 5, 7])
    seg = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    batch = {"inputs": rng.integers(4, cfg.vocab_size, (4, 12)).astype(np.int32), "segment_ids": seg,
             "positions": np.where(seg > 0, np.arange(12)[None], 0).astype(np.int32),
             "targets": np.array([[0], [2], [1], [1]], np.int32),
             "weights": np.array([[1], [1], [1], [0]], np.int32)}  # the last row: padding
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        got = jax.device_get(built.eval_step(params, batch))
    p = model_reference._f64(params)
    losses, right = [], []
    for i in range(3):
        n = lengths[i]  # the reference reads the real tokens only (padding is never attended to)
        x = p["token_embed"]["embedding"][batch["inputs"][i, :n]]
        h = model_reference._stack(p["encoder"], cfg, x, seg[i, :n], batch["positions"][i, :n],
                                   causal=False, num_layers=cfg.num_layers)
        pooled = np.tanh(model_reference._linear(h[0], p["pooler"]))
        logits = model_reference._linear(pooled, p["classifier"])
        log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        losses.append(-log_probs[batch["targets"][i, 0]])
        right.append(logits.argmax() == batch["targets"][i, 0])
    assert got["count"] == 3
    np.testing.assert_allclose(got["loss_sum"], sum(losses), rtol=1e-4)
    assert got["correct"] == sum(right)


def run_steps(built, state, mesh, config, batches):
    losses = []
    with sharding.use_mesh(mesh, config.sharding_rules):
        for batch in batches:
            state, metrics = built.train_step(state, sharding.global_batch(batch, built.batch_sharding))
            losses.append((float(metrics["loss"]), float(metrics["accuracy"])))
    return state, losses


def classification_batches(config, n):
    out = []
    for i in range(n):
        batch = fh.synthetic_batch(config, steps.batch_shapes(config), seed=i)
        rng = np.random.default_rng(100 + i)
        batch["targets"] = rng.integers(0, len(LABELS), batch["targets"].shape).astype(np.int32)
        batch["weights"] = np.ones_like(batch["weights"])
        batch["weights"][-1] = 0
        out.append(batch)
    return out


def test_eight_devices_equal_one(devices):
    """The classifier's head and [batch, 1] targets on the (2,2,2) mesh. (A seq2seq batch has the
    encoder-decoder pretraining layout, whose 8-device check is in test_encoder_decoder.py.)"""
    one = classify_config(**{"model.dropout_rate": 0.1})
    batches = classification_batches(one, 2)
    _, want = run_steps(*build(one, devices), one, batches)
    eight = classify_config(**{"model.dropout_rate": 0.1, "mesh.shape": (2, 2, 2)})
    _, got = run_steps(*build(eight, devices), eight, batches)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert want[1][0] != want[0][0]


def save(state, config, path, step=1):
    ckpt = Checkpointer(str(path), max_to_keep=1, async_save=False)
    ckpt.save(step, state, None, config.to_dict(), force=True)
    ckpt.close()


def test_init_from_mlm_checkpoint_loads_backbone_and_creates_head(devices, tmp_path):
    # Another seed than the fine-tuning run's: a fresh backbone then differs from the checkpoint.
    pre = fh.tiny_train_config("bert", seed=1)
    _, state, _ = build(pre, devices)  # (random weights are as good as trained ones here)
    save(state, pre, tmp_path / "mlm", step=3)
    pretrained = jax.device_get(state["params"])

    fine = classify_config(init_from=str(tmp_path / "mlm"), **{"mesh.shape": (2, 1, 2)})
    built8, fresh, mesh8 = build(fine, devices)
    with sharding.use_mesh(mesh8, fine.sharding_rules):
        restored, step = finetune.restore_init(fine, built8, fresh)
    assert step == 3 and int(restored["step"]) == 0
    params = jax.device_get(restored["params"])
    for key in ("token_embed", "encoder", "pooler"):  # the backbone, exactly
        jax.tree.map(np.testing.assert_array_equal, params[key], pretrained[key])
    assert not np.array_equal(jax.device_get(fresh["params"]["pooler"]["kernel"]),
                              pretrained["pooler"]["kernel"])
    # The head: new, as freshly initialised (not in the checkpoint); the MLM head: dropped.
    jax.tree.map(np.testing.assert_array_equal, params["classifier"],
                 jax.device_get(fresh["params"]["classifier"]))
    assert params["classifier"]["kernel"].shape == (32, 3) and params["classifier"]["kernel"].any()
    assert set(params) == {"token_embed", "encoder", "pooler", "classifier"}

    # Another backbone shape is still refused; a classifier checkpoint with other labels too.
    # (The config check comes before anything is built or read: no model needed.)
    other = classify_config(init_from=str(tmp_path / "mlm"), **{"model.d_model": 64})
    with pytest.raises(ValueError, match=r"model.d_model=32 there but 64 now"):
        finetune.restore_init(other, None, None)
    save(restored, fine, tmp_path / "cls")
    two = classify_config(init_from=str(tmp_path / "cls"), **{"data.labels": ("a", "b"),
                                                             "model.num_labels": 2})
    with pytest.raises(ValueError, match=r"model.num_labels=3 there but 2 now"):
        finetune.restore_init(two, None, None)


def test_frozen_backbone_trains_only_the_head(devices):
    config = classify_config(**{"optim.freeze": "^(token_embed|encoder|pooler)/",
                                "optim.weight_decay": 0.5})
    built, state, mesh = build(config, devices)
    before = jax.device_get(state["params"])
    state, _ = run_steps(built, state, mesh, config, classification_batches(config, 2))
    after = jax.device_get(state["params"])
    for path, value in jax.tree_util.tree_flatten_with_path(after)[0]:
        old = before
        for key in path:
            old = old[key.key]
        assert np.array_equal(value, old) == (path[0].key != "classifier"), path


# ---------------------------------------------------------------------------------------------
# End to end: easy synthetic tasks through the training loop.

WORDS = {"neg": ["awful", "bad", "terrible", "poor"], "pos": ["great", "good", "lovely", "fine"],
         "odd": ["seven", "three", "nine", "eleven"]}


def synthetic_task(root, n_train=160, n_eval=48):
    """Labelled sentences whose label word list decides the class (unbalanced: pos is 50%)."""
    rng = np.random.default_rng(0)
    records = []
    for _ in range(n_train + n_eval):
        label = rng.choice(LABELS, p=[0.3, 0.5, 0.2])
        filler = " ".join(rng.choice(["the", "a", "this", "was", "it", "very"], 3))
        records.append({"text": f"{filler} {rng.choice(WORDS[label])} {filler}", "label": label})
    files = {s: write_jsonl(root / f"{s}.jsonl", part) for s, part in
             (("train", records[:n_train]), ("eval", records[n_train:]))}
    majority = max(sum(r["label"] == c for r in records[n_train:]) for c in LABELS) / n_eval
    return files, records, majority


LOOP = {"total_steps": 40, "batch_size": 16, "seq_len": 16, "eval_every_steps": 40,
        "eval_steps": 3, "log_every_steps": 10, "checkpoint_every_steps": 40,
        "optim.learning_rate": 1e-2, "optim.warmup_steps": 3, "model.vocab_size": 512,
        "model.dropout_rate": 0.0, "mesh.shape": (-1, 1, 1)}


@pytest.mark.slow
def test_classification_run_beats_majority(tmp_path, tokenizer_path):
    from llmjax.train import train_and_evaluate
    files, _, majority = synthetic_task(tmp_path)
    config = classify_config(**LOOP, **{"data.files": files["train"], "data.eval_files": files["eval"],
                                        "data.tokenizer": tokenizer_path})
    last = train_and_evaluate(config, str(tmp_path / "run"))
    assert last["eval_accuracy"] > majority + 0.2, (last, majority)
    assert "accuracy" in last and np.isfinite(last["eval_loss"])
    # The saved run predicts the same: its config carries the label list.
    from llmjax.generate import load_run
    run = load_run(str(tmp_path / "run"))
    assert tuple(run.config.data.labels) == LABELS
    assert stdlib_modules.teacher_forced_accuracy(run, run.config.data) == pytest.approx(
        last["eval_accuracy"])


# Short targets (one piece each in the test tokenizer): a from-scratch decoder learns to spell
# them within the few steps a test can afford.
TARGETS = {"neg": "def", "pos": "return", "odd": "None"}


def majority_token_accuracy(tokenizer, train, evaluation):
    """Token accuracy (targets + eos) of always answering the most common training target."""
    common = max(set(e["target"] for e in train), key=[e["target"] for e in train].count)
    guess = tokenizer.encode(common) + [tokenizer.eos_id]
    right = total = 0
    for e in evaluation:
        want = tokenizer.encode(e["target"]) + [tokenizer.eos_id]
        right += sum(a == b for a, b in zip(guess, want))
        total += len(want)
    return right / total


@pytest.mark.slow
def test_seq2seq_run_beats_majority(tmp_path, tokenizer_path):
    from llmjax.data.tokenizer import Tokenizer
    from llmjax.train import train_and_evaluate
    # Shorter inputs than the classifier's: learning cross-attention from scratch takes longer
    # than the few steps a test can afford when the keyword hides among filler words.
    rng = np.random.default_rng(1)
    s2s = []
    for _ in range(208):
        label = rng.choice(LABELS, p=[0.3, 0.5, 0.2])
        s2s.append({"input": f"{rng.choice(['the', 'a', 'it'])} {rng.choice(WORDS[label])}",
                    "target": TARGETS[label]})
    train, evaluation = s2s[:160], s2s[160:]
    files = {s: write_jsonl(tmp_path / f"s2s_{s}.jsonl", part)
             for s, part in (("train", train), ("eval", evaluation))}
    config = fh.tiny_train_config("bart", **{
        **LOOP, "data.task": "seq2seq", "data.files": files["train"], "data.eval_files": files["eval"],
        "data.tokenizer": tokenizer_path, "data.target_len": 4, "total_steps": 100,
        "eval_every_steps": 100, "checkpoint_every_steps": 100, "log_every_steps": 50})
    last = train_and_evaluate(config, str(tmp_path / "run"))
    majority = majority_token_accuracy(Tokenizer.load(tokenizer_path), train, evaluation)
    assert last["eval_accuracy"] > majority + 0.1, (last, majority)
    from llmjax.generate import load_run
    exact = stdlib_modules.teacher_forced_accuracy(load_run(str(tmp_path / "run")), config.data)
    assert exact > stdlib_modules.majority_accuracy(train, evaluation, "target") + 0.2


def test_shipped_task_forms_share_the_splits():
    sft = tasks.stdlib_module_examples(modules=("tarfile", "http"), per_class=30)
    cls = tasks.stdlib_module_examples(modules=("tarfile", "http"), per_class=30, form="classification")
    s2s = tasks.stdlib_module_examples(modules=("tarfile", "http"), per_class=30, form="seq2seq")
    for split in ("train", "validation"):
        assert [e["label"] for e in cls[split]] == [e["target"] for e in s2s[split]] == [
            e["response"].strip() for e in sft[split]]
        assert [f"Docstring: {e['text']}\nModule:" for e in cls[split]] == [
            e["prompt"] for e in sft[split]]
        assert [e["text"] for e in cls[split]] == [e["input"] for e in s2s[split]]
    # A run from scratch on a shipped task trains its tokenizer on the task's source corpus.
    data = classify_config(**{"data.name": "stdlib_modules"}).data
    assert finetune.tokenizer_data(data).name == "stdlib" and data.name == "stdlib_modules"
    assert finetune.tokenizer_data(classify_config().data).name == "stdlib"  # the default corpus


@pytest.mark.parametrize("name, arg", [("classify_stdlib_modules", "runlocal"),
                                       ("classify_stdlib_modules", "runlocal,roberta"),
                                       ("classify_stdlib_modules", None),
                                       ("seq2seq_stdlib_modules", "runlocal"),
                                       ("seq2seq_stdlib_modules", "runlocal,bart")])
def test_shipped_configs_are_valid(name, arg):
    config = fh.load_config(name, arg)
    validate_config(config)
    model_cfg = steps.ModelConfig.from_config(config.model)
    shapes = steps.batch_shapes(config, model_cfg)
    if name.startswith("classify"):
        assert model_cfg.num_labels == len(config.data.labels) == 8
        assert shapes["targets"] == (config.batch_size, 1)
    else:
        assert shapes["targets"] == (config.batch_size, config.data.target_len)
    # The model section equals its pretraining config's, so init_from accepts that run.
    from llmjax.checkpoint import check_same_model
    pre = {"classify_stdlib_modules": "bert_base", "seq2seq_stdlib_modules": "t5_small"}[name]
    if arg and "roberta" in arg:
        pre = "roberta_base"
    if arg and "bart" in arg:
        pre = "bart_base"
    check_same_model(fh.load_config(pre, "runlocal" if arg else None).to_dict(), config, "pre",
                     fine_tuning=True)


def test_fine_tuning_from_a_prepared_tfds_dataset(tmp_path):
    """The catalog path (as for SFT): a TFDS dataset prepared as array_record, read by name, its
    features named by the task's keys (here a text corpus: features `path` and `text`)."""
    from llmjax.data import corpus
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"body {i % 2}")
    text = fh.tiny_train_config("bert", **{"data.name": "text", "data.files": str(tmp_path / "*.txt"),
                                            "data.data_dir": str(tmp_path / "tfds"),
                                            "data.validation_fraction": 0.3,
                                            # the six bodies repeat on purpose: no dedup here
                                            "data.hygiene.enabled": False}).data
    builder = corpus.prepare(text)
    name = f"{builder.name}/{builder.builder_config.name}"
    s2s = seq2seq_config(**{"data.data_dir": str(tmp_path / "tfds"), "data.name": name,
                            "data.input_key": "path", "data.target_key": "text"}).data
    examples = finetune.load_examples(s2s, "train") + finetune.load_examples(s2s, "validation")
    assert len(examples) == 6  # input "docN.txt", target "body N % 2"
    assert all(e["target"] == f"body {int(e['input'][3]) % 2}" for e in examples), examples
    cls = classify_config(**{"data.data_dir": str(tmp_path / "tfds"), "data.name": name,
                             "data.text_key": "path", "data.label_key": "text",
                             "data.labels": ("body 0", "body 1"), "model.num_labels": 2}).data
    labelled = finetune.load_examples(cls, "train") + finetune.load_examples(cls, "validation")
    assert sorted(e["label"] for e in labelled) == ["body 0"] * 3 + ["body 1"] * 3
    with cls.unlocked():
        cls.labels = ("body 0",)
    with pytest.raises(ValueError, match=r"example \d+: label 'body 1' is not in data.labels"):
        finetune.load_examples(cls, "train") + finetune.load_examples(cls, "validation")
