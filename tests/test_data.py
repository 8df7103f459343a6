"""Tests for llmjax.data: corpora, tokenizer and the Grain pipeline.

Everything runs on two small corpora built once per module in a temporary data dir: the
standard-library corpus (the default one) and 30 tiny text files whose documents carry a marker
`@@NNN@@`, so a test can tell from decoded batches which documents a process read.
"""

import json
import math
import re
import subprocess
import sys
import textwrap

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax.data import corpus, documents, pipeline, stats
from llmjax.data import tokenizer as tokenizer_lib

SEQ_LEN = 32
MARKER = re.compile(r"@@(\d{3})@@")


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def stdlib_cfg(data_dir):
    return _cfg(name="stdlib", data_dir=data_dir)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    for i in range(30):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        body = " ".join(words[(i + j) % len(words)] for j in range(8 + i % 5))
        (sub / f"doc{i:03d}.txt").write_text(f"@@{i:03d}@@ {body}.\n")
    return root


@pytest.fixture(scope="module")
def text_cfg(data_dir, text_files):
    return _cfg(
        name="text",
        files=f"{text_files}/a/*.txt,{text_files}/b/*.txt",
        data_dir=data_dir,
        validation_fraction=0.1,
    )


@pytest.fixture(scope="module")
def tok(stdlib_cfg):
    source = corpus.load_split(stdlib_cfg, "train")
    return tokenizer_lib.train_tokenizer(
        tokenizer_lib._sample_documents(source, 1_000_000), 512, None
    )


def _markers(source):
    return [MARKER.search(source[i]).group(1) for i in range(len(source))]


def _stream_text(batches, tok):
    """The text of consecutive batches: rows are consecutive pieces of one token stream."""
    ids = np.concatenate([b["inputs"][b["segment_ids"] != 0] for b in batches])
    return tok.decode(ids)


# --- corpus ---------------------------------------------------------------------------------


def test_stdlib_corpus_has_disjoint_splits(stdlib_cfg):
    builder = corpus.prepare(stdlib_cfg)
    train, val = (builder.as_data_source(split=s) for s in ("train", "validation"))
    train_paths = {train[i]["path"] for i in range(len(train))}
    val_paths = {val[i]["path"] for i in range(len(val))}
    assert len(train_paths) > 500 and len(val_paths) >= 1
    assert not train_paths & val_paths
    assert b"json/decoder.py" in train_paths | val_paths
    assert any(p.startswith(b"pydoc_data/topics/") for p in train_paths | val_paths)
    assert not any(p.startswith((b"test/", b"idlelib/")) or b"/tests/" in p for p in train_paths)
    # Every document, less those hygiene removed (duplicates; its report counts them).
    report = json.loads(open(corpus.hygiene_report_path(stdlib_cfg)).read())
    assert report["total"]["documents_in"] == len(documents.stdlib_documents())
    assert len(train_paths) + len(val_paths) == report["total"]["documents_out"]


def test_second_prepare_reuses_the_cache(stdlib_cfg, monkeypatch):
    corpus.prepare(stdlib_cfg)
    corpus._PREPARED.clear()  # Forget the in-process cache: only the on-disk one may be used.

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a corpus that was already prepared")

    monkeypatch.setattr(corpus.LlmjaxText, "download_and_prepare", fail)
    assert corpus.prepare(stdlib_cfg).info.splits["train"].num_examples > 500


def test_text_corpus_holds_out_documents(text_cfg):
    train, val = corpus.load_split(text_cfg, "train"), corpus.load_split(text_cfg, "validation")
    assert len(train) + len(val) == 30 and 1 <= len(val) <= 8
    assert not set(_markers(train)) & set(_markers(val))
    # Paths are relative to the files' common directory, so moving the corpus keeps the split.
    assert {val.record(i)["path"][:2] for i in range(len(val))} <= {b"a/", b"b/"}


def test_held_out_is_stable_and_never_empty():
    docs = [documents.Document(path=f"d{i}") for i in range(200)]
    chosen = documents.held_out(docs, 0.1)
    assert 5 <= len(chosen) <= 40
    assert documents.held_out(docs[::-1], 0.1) == chosen  # Order of listing does not matter.
    # Removing documents does not move the others across the split.
    assert documents.held_out(docs[:150], 0.1) == {d.path for d in docs[:150]} & chosen
    assert len(documents.held_out(docs[:3], 0.0)) == 1
    with pytest.raises(ValueError, match="at least 2"):
        documents.held_out(docs[:1], 0.02)


def test_glob_without_matches_is_a_clear_error(data_dir, tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ValueError, match=re.escape(repr(pattern)) + ".*matches no files"):
        corpus.load_split(_cfg(name="text", files=pattern, data_dir=data_dir), "train")


def test_unprepared_catalog_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ValueError, match=r"tfds build lm1b --file_format=array_record --data_dir="):
        corpus.load_split(_cfg(name="lm1b", data_dir=str(tmp_path)), "train")


def test_prepared_tfds_dataset_is_read_by_name(text_cfg):
    """The catalog path: any array_record TFDS dataset in data_dir, read by its registered name
    (here one our builder prepared, since catalog datasets cannot be downloaded offline)."""
    builder = corpus.prepare(text_cfg)
    by_name = _cfg(name=f"{builder.name}/{builder.builder_config.name}", data_dir=text_cfg.data_dir)
    for split in ("train", "validation"):
        local, catalog = corpus.load_split(text_cfg, split), corpus.load_split(by_name, split)
        assert len(catalog) == len(local) > 0
        assert [catalog[i] for i in range(len(catalog))] == [local[i] for i in range(len(local))]


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    assert corpus.resolve_data_dir(_cfg()) == str(tmp_path)
    assert corpus.resolve_data_dir(_cfg(data_dir="/x/y")) == "/x/y"


def test_concurrent_first_builds_agree(tmp_path, text_files):
    script = textwrap.dedent(f"""
      import ml_collections
      from llmjax.data import corpus
      cfg = ml_collections.ConfigDict(dict(name="text", files="{text_files}/*/*.txt", data_dir="{tmp_path}"))
      print(len(corpus.load_split(cfg, "train")), len(corpus.load_split(cfg, "validation")))
  """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    first, second = (out.splitlines()[-1].split() for out, _ in outs)  # TFDS prints above it.
    assert first == second and int(first[0]) + int(first[1]) == 30


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_round_trips_any_text(tok):
    for text in [
        "def f(x):\n    return  x + 1\n\n",
        "\ttabs\tand  spaces  ",
        "Grüße, 日本語, emoji 🙂 ∑",
        "",
        "  leading and trailing  \n",
    ]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    assert tok.decode([tok.bos_id, *tok.encode("x = 1"), tok.eos_id, 0, 0]) == "x = 1"


def test_tokenizer_training_is_deterministic(stdlib_cfg, tmp_path):
    source = corpus.load_split(stdlib_cfg, "train")
    paths = [tmp_path / f"t{i}.model" for i in range(2)]
    for path in paths:
        tokenizer_lib.train_tokenizer(
            tokenizer_lib._sample_documents(source, 300_000), 400, path, max_chars=300_000
        )
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # The atomic write left no temporary file behind.


def test_small_corpus_gives_a_smaller_vocab_instead_of_failing():
    tok = tokenizer_lib.train_tokenizer(["hello world\nthe quick brown fox\n"] * 20, 4000, None)
    assert 260 < tok.vocab_size < 4000
    tokenizer_lib.check_vocab(tok, 4000)  # Smaller than the model's vocabulary is fine.


def test_load_or_train_tokenizer_trains_once_then_loads(text_cfg, tmp_path, monkeypatch):
    first = tokenizer_lib.load_or_train_tokenizer(text_cfg, 300, str(tmp_path))
    assert (tmp_path / "tokenizer.model").exists() and first.path == str(
        tmp_path / "tokenizer.model"
    )

    def fail(*args, **kwargs):
        raise AssertionError("trained again although WORKDIR/tokenizer.model exists")

    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", fail)
    again = tokenizer_lib.load_or_train_tokenizer(text_cfg, 300, str(tmp_path))
    assert again.encode("alpha beta @@001@@") == first.encode("alpha beta @@001@@")
    given = text_cfg.copy_and_resolve_references()
    given.tokenizer = str(tmp_path / "tokenizer.model")
    assert (
        tokenizer_lib.load_or_train_tokenizer(given, 999, str(tmp_path / "other")).vocab_size
        == first.vocab_size
    )


def test_tokenizer_pickles_by_value(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert (
        clone.encode("import os\n") == tok.encode("import os\n")
        and clone.vocab_size == tok.vocab_size
    )


def test_vocab_larger_than_model_is_an_error(tok):
    with pytest.raises(
        ValueError, match=r"512 pieces but model\.vocab_size is 256.*data\.tokenizer"
    ):
        tokenizer_lib.check_vocab(tok, 256)
    tokenizer_lib.check_vocab(tok, 512)


# --- pipeline -------------------------------------------------------------------------------


def _train(cfg, tok, seed=0, batch_size=4, process_index=0, process_count=1, **kw):
    return pipeline.make_train_iterator(
        cfg,
        tok,
        seq_len=SEQ_LEN,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        **kw,
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def stdlib_batches(stdlib_cfg, tok):
    return _take(_train(stdlib_cfg, tok, batch_size=8), 6)


def test_batch_shapes_and_dtypes(stdlib_batches):
    for batch in stdlib_batches:
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "weights"}
        for v in batch.values():
            assert v.shape == (8, SEQ_LEN) and v.dtype == np.int32


def test_targets_are_inputs_shifted_within_segments(stdlib_batches, tok):
    for batch in stdlib_batches:
        seg, inp, tgt = batch["segment_ids"], batch["inputs"], batch["targets"]
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        np.testing.assert_array_equal(tgt[:, :-1][same], inp[:, 1:][same])
        # A segment's first input is a document's bos or a continuation of one; bos is never a target.
        assert not (tgt == tok.bos_id).any()
        starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert ((inp == tok.bos_id) <= starts).all()  # bos only at a segment's start.


def test_positions_restart_per_segment_and_padding_is_zero(stdlib_batches):
    for batch in stdlib_batches:
        seg, pos = batch["segment_ids"], batch["positions"]
        assert (
            (seg[:, 0] == 1).all()
            and (np.diff(seg, axis=1) >= 0).all()
            and (np.diff(seg, axis=1) <= 1).all()
        )
        assert (seg != 0).all()  # An endless stream packs every row full: no padding at all.
        starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert (pos[starts] == 0).all()
        np.testing.assert_array_equal(pos[:, 1:][~starts[:, 1:]], pos[:, :-1][~starts[:, 1:]] + 1)


def test_every_token_is_predicted_exactly_once(text_cfg, tok):
    # Eval reads documents in stored order; with a one-row shuffle window the packed stream can be
    # compared token by token.
    text_cfg = ml_collections.ConfigDict({**text_cfg.to_dict(), "shuffle_tokens": SEQ_LEN})
    batches = pipeline.make_eval_batches(
        text_cfg,
        tok,
        seq_len=SEQ_LEN,
        batch_size=2,
        num_batches=20,
        process_index=0,
        process_count=1,
    )
    source = corpus.load_split(text_cfg, "validation")
    docs = [tok.encode(source[i]) for i in range(len(source))]
    want_targets = np.concatenate([ids + [tok.eos_id] for ids in docs] * 100)
    want_inputs = np.concatenate([[tok.bos_id] + ids for ids in docs] * 100)
    got_targets = np.concatenate([b["targets"].ravel() for b in batches])
    got_inputs = np.concatenate([b["inputs"].ravel() for b in batches])
    np.testing.assert_array_equal(got_targets, want_targets[: len(got_targets)])
    np.testing.assert_array_equal(got_inputs, want_inputs[: len(got_inputs)])
    assert len(got_targets) > 2 * sum(len(d) + 1 for d in docs)  # The split was cycled.


def test_same_seed_same_batches_other_seed_other_batches(stdlib_cfg, tok, stdlib_batches):
    _assert_same(_take(_train(stdlib_cfg, tok, batch_size=8), 6), stdlib_batches)
    other = _take(_train(stdlib_cfg, tok, batch_size=8, seed=1), 6)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(other, stdlib_batches))


def test_processes_read_disjoint_shards_and_reshuffle_each_epoch(text_cfg, tok):
    # A one-row shuffle window keeps epochs apart in the stream, so they can be told apart.
    text_cfg = ml_collections.ConfigDict({**text_cfg.to_dict(), "shuffle_tokens": SEQ_LEN})
    train_docs = _markers(corpus.load_split(text_cfg, "train"))
    seen = []
    for index in range(2):
        batches = _take(
            _train(text_cfg, tok, batch_size=4, process_index=index, process_count=2), 80
        )
        assert all(v.shape == (2, SEQ_LEN) for b in batches for v in b.values())
        order = MARKER.findall(_stream_text(batches, tok))
        shard = set(order)
        n = len(shard)
        assert n >= len(train_docs) // 2 and len(order) >= 2 * n, "expected two full epochs"
        epochs = [order[:n], order[n : 2 * n]]
        assert (
            sorted(epochs[0]) == sorted(epochs[1]) == sorted(shard)
        )  # Each epoch sees each document once.
        assert epochs[0] != epochs[1]  # ... in a new order.
        seen.append(shard)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(train_docs)


def test_rows_are_shuffled_within_a_window(stdlib_cfg, tok):
    """With a window of W rows, the first W rows are the packer's first W rows in another order."""
    window_rows, rows = 32, 4
    plain = ml_collections.ConfigDict({**stdlib_cfg.to_dict(), "shuffle_tokens": SEQ_LEN})
    mixed = ml_collections.ConfigDict(
        {**stdlib_cfg.to_dict(), "shuffle_tokens": SEQ_LEN * window_rows}
    )
    n = window_rows // rows
    rows_of = lambda bs: [tuple(r) for b in bs for r in b["inputs"]]
    plain_rows = rows_of(_take(_train(plain, tok, batch_size=rows), n))
    mixed_rows = rows_of(_take(_train(mixed, tok, batch_size=rows), n))
    assert sorted(plain_rows) == sorted(mixed_rows)
    assert plain_rows != mixed_rows


def test_batch_size_must_divide_over_processes(text_cfg, tok):
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        _train(text_cfg, tok, batch_size=3, process_count=2)


def test_state_restores_the_exact_position(stdlib_cfg, tok):
    it = _train(stdlib_cfg, tok)
    fresh_state = json.loads(json.dumps(it.get_state()))
    first = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
    following = _take(it, 3)
    restored = _train(stdlib_cfg, tok)
    restored.set_state(state)
    _assert_same(_take(restored, 3), following)
    # A state saved before the first batch (no partial document pending) restores too.
    restored.set_state(fresh_state)
    _assert_same(_take(restored, 5), first)


def test_orbax_checkpoint_round_trip(stdlib_cfg, tok, tmp_path):
    it = _train(stdlib_cfg, tok)
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    following = _take(it, 3)
    restored = _train(stdlib_cfg, tok)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(
            mgr.latest_step(),
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)),
        )
    _assert_same(_take(restored, 3), following)


def test_eval_batches_are_identical_across_calls(stdlib_cfg, tok):
    kw = dict(seq_len=SEQ_LEN, batch_size=4, num_batches=5, process_index=0, process_count=1)
    first = pipeline.make_eval_batches(stdlib_cfg, tok, **kw)
    assert len(first) == 5 and first[0]["inputs"].shape == (4, SEQ_LEN)
    _assert_same(pipeline.make_eval_batches(stdlib_cfg, tok, **kw), first)


def test_unigram_baseline_is_sane(stdlib_batches, tok):
    entropy = stats.unigram_entropy(stdlib_batches)
    assert 1.0 < entropy < math.log(tok.vocab_size)


def test_workdir_records_the_data_spec(text_cfg, tok, tmp_path):
    _train(text_cfg, tok, workdir=str(tmp_path))
    spec = json.loads((tmp_path / "data_spec.json").read_text())
    assert (
        spec["data"]["name"] == "text"
        and spec["seq_len"] == SEQ_LEN
        and spec["tokenizer_vocab_size"] == 512
    )


def test_worker_process_gives_the_in_process_batches(text_cfg, tok):
    # One worker reads the whole shard, so its batches must equal the in-process pipeline's.
    cfg = text_cfg.copy_and_resolve_references()
    cfg.num_workers = 1
    it = _train(cfg, tok)
    try:
        got = _take(it, 3)
    finally:
        it.close()
    _assert_same(got, _take(_train(text_cfg, tok), 3))
