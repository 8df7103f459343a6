"""Tests for corpus formats (readers.py), prepare-once (prepare.py) and training on prepared shards.

The corpora are tiny (a few dozen short documents) and the tokenizer has at most 512 pieces, so the whole
module runs in well under a minute on one core.
"""

import gzip
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest

from llmjax.data import documents, pipeline, prepare, readers
from llmjax.data import tokenizer as tokenizer_lib

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
TEXTS = [f"doc {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 9))
         + ("\nsecond line" if i % 3 else "") for i in range(40)]
SEQ_LEN, BATCH = 16, 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    tokenizer_lib.train_tokenizer(TEXTS * 5, 512, path)
    return tokenizer_lib.Tokenizer.load(path)


def _write(path, texts, fmt):
    """Writes `texts` as `fmt`; returns the path data.files should name."""
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    if fmt == "jsonl":
        path.write_text(lines)
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write(lines)
    elif fmt == "jsonl.zst":
        import zstandard
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path,
                       row_group_size=7)  # several row groups, read one at a time
    elif fmt == "arrow_dir":
        datasets = pytest.importorskip(
            "datasets", reason="the save_to_disk fixture is written with Hugging Face datasets")
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path), max_shard_size="1KB")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow_dir"])
def test_record_formats_round_trip(tmp_path, fmt):
    path = _write(tmp_path / f"corpus.{fmt}", TEXTS, fmt)
    assert readers.format_of(str(path)) in ("jsonl", "parquet", "arrow")
    assert list(readers.read_texts(str(path))) == TEXTS
    assert readers.count_records(str(path)) == len(TEXTS)
    assert readers.expand(f"{tmp_path}/corpus*") == [str(path)]


@pytest.mark.parametrize("suffix", ["txt", "txt.gz", "txt.zst"])
def test_text_formats_round_trip(tmp_path, suffix):
    text = "one document\nwith two lines é\n"
    path = tmp_path / f"a.{suffix}"
    data = text.encode()
    if suffix.endswith("gz"):
        data = gzip.compress(data)
    elif suffix.endswith("zst"):
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    assert readers.format_of(str(path)) == "text"
    assert list(readers.read_texts(str(path))) == [text]
    doc = documents.file_documents(str(path))[0]
    assert doc.read() == text and doc.record == -1


@pytest.mark.parametrize("files,processes", [(5, 2), (5, 5), (2, 3), (1, 4)])
def test_process_shards_cover_every_record_once(tmp_path, files, processes):
    paths = [str(_write(tmp_path / f"f{k}.jsonl", TEXTS[k::files], "jsonl")) for k in range(files)]
    seen = [(f, i) for p in range(processes) for f, i, _ in readers.read_shard(paths, p, processes)]
    assert sorted(seen) == sorted((p, i) for p in paths for i in range(len(TEXTS[paths.index(p)::files])))


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="matches no files"):
        readers.expand(f"{tmp_path}/nothing*.jsonl")
    (tmp_path / "a.txt.bz2").write_bytes(b"x")
    with pytest.raises(ValueError, match="format llmjax cannot read"):
        readers.format_of(str(tmp_path / "a.txt.bz2"))
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"no field 'text' \(it has \['body'\]\); set data.text_key"):
        list(readers.read_texts(str(tmp_path / "b.jsonl")))
    pq_path = _write(tmp_path / "c.parquet", TEXTS, "parquet")
    with pytest.raises(ValueError, match="no column 'body'"):
        list(readers.read_texts(str(pq_path), "body"))


def test_jsonl_records_are_documents_of_the_text_corpus(tmp_path):
    _write(tmp_path / "a.jsonl", TEXTS[:10], "jsonl")
    docs = documents.file_documents(f"{tmp_path}/*.jsonl")
    assert [d.path for d in docs] == [f"a.jsonl#{i}" for i in range(10)]
    assert [d.read() for d in docs] == TEXTS[:10]  # in order: one pass over the file
    assert docs[3].read() == TEXTS[3]  # and out of order


# ------------------------------------------------------------------------------------------------
# prepare


def _cfg(tmp_path, files, tok, **data):
    c = ml_collections.ConfigDict()
    c.seq_len = SEQ_LEN
    c.model = ml_collections.ConfigDict({"vocab_size": 512})
    c.data = ml_collections.ConfigDict(dict(
        name="text", files=files, data_dir=str(tmp_path / "tfds"), validation_fraction=0.1,
        tokenizer=tok.path if tok else "", shuffle_tokens=64, hygiene={"enabled": False}, **data))
    return c


def _prepared(cfg, out):
    c = cfg.copy_and_resolve_references()
    c.data.update(name="prepared", data_dir=str(out), files="")
    return c.data


def _batches(data_cfg, tok, n, **kw):
    it = pipeline.make_train_iterator(data_cfg, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=3,
                                      process_index=0, process_count=1, **kw)
    return it, [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def txt_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt")
    for i, t in enumerate(TEXTS):
        (root / f"d{i:02d}.txt").write_text(t)
    return root


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_prepared_shards_give_the_on_the_fly_batches(tmp_path, txt_corpus, tok, kind):
    if kind == "txt":
        files = f"{txt_corpus}/*.txt"
    else:
        _write(tmp_path / "a.jsonl", TEXTS[:25], "jsonl")
        _write(tmp_path / "b.jsonl.gz", TEXTS[25:], "jsonl.gz")
        files = f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl.gz"
    cfg = _cfg(tmp_path, files, tok)
    manifest = prepare.prepare(cfg, tmp_path / "out", processes=1, shards=3, log=lambda *_: None)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"][
        "documents"] == len(TEXTS)
    _, live = _batches(cfg.data, tok, 12)
    _, prep = _batches(_prepared(cfg, tmp_path / "out"), tok, 12)
    _assert_same(live, prep)
    kw = dict(seq_len=SEQ_LEN, batch_size=BATCH, num_batches=3, process_index=0, process_count=1)
    _assert_same(pipeline.make_eval_batches(cfg.data, tok, **kw),
                 pipeline.make_eval_batches(_prepared(cfg, tmp_path / "out"), tok, **kw))


def test_prepare_in_processes_resumes_after_an_interruption(tmp_path, txt_corpus, tok):
    cfg = _cfg(tmp_path, f"{txt_corpus}/*.txt", tok, tokenizer_train_chars=100_000)
    cfg.data.tokenizer = ""  # trains one, stored in --out
    cfg.data.hygiene = {"enabled": True}
    out = tmp_path / "out"
    first = prepare.prepare(cfg, out, processes=2, shards=4, log=lambda *_: None)
    assert first["hygiene"]["splits"]["train"]["documents_in"] > 0
    assert first["tokenizer"]["sha256"] and os.path.exists(out / "tokenizer.model")
    files = {p: (out / p).read_bytes() for p in ["index-train.npy", "index-validation.npy"]
             + [s["file"] for s in first["shards"]]}
    # An interruption: shard 2 half written (no sidecar), shard 3 never started, manifest unfinished.
    shard2 = out / first["shards"][2]["file"]
    shard2.write_bytes(shard2.read_bytes()[:10])
    os.remove(str(shard2) + ".meta.pkl")
    os.remove(out / first["shards"][3]["file"])
    os.remove(str(out / first["shards"][3]["file"]) + ".meta.pkl")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({"complete": False, "plan": manifest["plan"]}))
    with pytest.raises(ValueError, match="was interrupted; run the same"):
        prepare.load_manifest(str(out))
    resumed_log = []
    again = prepare.prepare(cfg, out, processes=1, shards=4, log=resumed_log.append)
    assert resumed_log == ["resuming: 2 of 4 shards already complete"]
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}
    assert strip(again) == strip(first)
    assert {p: (out / p).read_bytes() for p in files} == files


def test_training_from_prepared_shards_resumes_exactly(tmp_path, txt_corpus, tok):
    cfg = _cfg(tmp_path, f"{txt_corpus}/*.txt", tok)
    prepare.prepare(cfg, tmp_path / "out", processes=1, shards=2, log=lambda *_: None)
    data_cfg = _prepared(cfg, tmp_path / "out")
    it, first = _batches(data_cfg, tok, 5)
    state = json.loads(json.dumps(it.get_state()))  # as Orbax stores it
    expected = [next(it) for _ in range(7)]
    restored, _ = _batches(data_cfg, tok, 0)
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(7)], expected)
    # And the workdir gets the prepared tokenizer, so generate finds it.
    workdir = tmp_path / "work"
    loaded = tokenizer_lib.load_or_train_tokenizer(data_cfg, 512, str(workdir))
    assert (workdir / "tokenizer.model").read_bytes() == (tmp_path / "out" / "tokenizer.model").read_bytes()
    assert loaded.vocab_size == tok.vocab_size


def test_another_tokenizer_is_refused(tmp_path, txt_corpus, tok):
    cfg = _cfg(tmp_path, f"{txt_corpus}/*.txt", tok)
    out = tmp_path / "out"
    prepare.prepare(cfg, out, processes=1, shards=2, log=lambda *_: None)
    other = tokenizer_lib.train_tokenizer(TEXTS * 5, 400, tmp_path / "other.model")
    with pytest.raises(ValueError, match=r"^The tokenizer .* is not the one .* was prepared with"):
        pipeline.make_train_iterator(_prepared(cfg, out), other, seq_len=SEQ_LEN, batch_size=BATCH,
                                     seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="is not the one"):
        data_cfg = _prepared(cfg, out)
        data_cfg.tokenizer = str(tmp_path / "other.model")
        tokenizer_lib.load_or_train_tokenizer(data_cfg, 512, str(tmp_path / "w"))
    cfg.data.tokenizer = str(tmp_path / "other.model")
    with pytest.raises(ValueError, match="differs from the tokenizer"):
        prepare.prepare(cfg, out, processes=1, shards=2, log=lambda *_: None)


def test_prepared_dir_errors_are_one_sentence(tmp_path, tok):
    with pytest.raises(ValueError, match="data.data_dir, which is not set"):
        prepare.load_manifest("")
    with pytest.raises(ValueError, match="has no manifest.json; prepare it first"):
        prepare.load_manifest(str(tmp_path))
    cfg = _cfg(tmp_path, f"{tmp_path}/none*.parquet", tok)
    with pytest.raises(ValueError, match="matches no files"):
        prepare.prepare(cfg, tmp_path / "out", processes=1, log=lambda *_: None)


def test_sidecar_marks_a_complete_shard(tmp_path, txt_corpus, tok):
    cfg = _cfg(tmp_path, f"{txt_corpus}/*.txt", tok)
    m = prepare.prepare(cfg, tmp_path / "out", processes=1, shards=2, log=lambda *_: None)
    meta = pickle.loads((tmp_path / "out" / (m["shards"][0]["file"] + ".meta.pkl")).read_bytes())
    assert sum(r["written"] for r in meta["records"]) == m["shards"][0]["records"]
    assert {s["path"] for s in m["sources"]} == {f"d{i:02d}.txt" for i in range(len(TEXTS))}


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet", "txt.gz"])
def test_a_damaged_file_is_one_sentence_naming_it(tmp_path, fmt):
    path = tmp_path / f"bad.{fmt}"
    if fmt == "txt.gz":
        with gzip.open(path, "wt") as f:
            f.write("some text " * 1000)
    else:
        _write(path, TEXTS * 20, fmt)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a copy cut short
    with pytest.raises(ValueError) as info:
        list(readers.read_texts(str(path)))
    line = str(info.value)
    assert line.startswith(f"{path} cannot be read as ") and "\n" not in line, line
    assert "fix or remove it" in line


def test_personal_data_never_reaches_the_token_shards(tmp_path):
    """Planted personal data is replaced before tokenizing; duplicates are dropped; the shards
    decode to the scrubbed texts only (the tokenizer, trained by prepare on the scrubbed corpus,
    covers every character the secrets are made of, so a leak would decode back)."""
    import random
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnoprstuvw") for _ in range(rng.randint(3, 8)))
             for _ in range(400)]
    texts = [f"note {i}: " + " ".join(rng.choice(vocab) for _ in range(60)) for i in range(30)]
    texts[0] += (" charset 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ "
                 ". - : / @ + < > _ =")
    secrets = {"jane.doe@example.org": "<EMAIL>", "+1 415 555 0134": "<PHONE>",
               "192.168.17.42": "<IP_ADDRESS>", "4111 1111 1111 1111": "<CREDIT_CARD>",
               "078-05-1120": "<GOV_ID>", "AKIAIOSFODNN7EXAMPLE": "<SECRET>",
               "hunter2pass": "<SECRET>"}
    texts[3] += " write to jane.doe@example.org or call +1 415 555 0134 today"
    texts[4] += " the server 192.168.17.42 took card 4111 1111 1111 1111 and ssn 078-05-1120"
    texts[5] += " key AKIAIOSFODNN7EXAMPLE and https://admin:hunter2pass@db.internal/x"
    look_alikes = "version 3.11.2 released 2024-10-07 sha 9f86d081884c7d659a2feaa0c55ad015"
    texts[6] += " " + look_alikes
    texts += [texts[7], texts[8]]  # two exact copies
    _write(tmp_path / "c.jsonl", texts, "jsonl")
    cfg = _cfg(tmp_path, f"{tmp_path}/c.jsonl", None, tokenizer_train_chars=100_000)
    cfg.data.tokenizer = ""  # prepare trains one on the scrubbed corpus
    cfg.data.hygiene = {"enabled": True}
    manifest = prepare.prepare(cfg, tmp_path / "out", processes=1, shards=2, log=lambda *_: None)
    tok = prepare.load_tokenizer(str(tmp_path / "out"))
    decoded = []
    for split in ("train", "validation"):
        source = prepare.PreparedSource(str(tmp_path / "out"), split)
        decoded += [tok.decode(list(source[i])) for i in range(len(source))]
    everything = "\n".join(decoded)
    assert len(decoded) == 30  # 32 in, the two copies out
    assert "0123456789" in everything and "@ +" in everything  # the characters decode back
    for secret, placeholder in secrets.items():
        assert secret not in everything, secret
        assert placeholder in everything, placeholder
    assert look_alikes in everything  # versions, dates and hashes stay
    report = json.dumps(manifest["hygiene"])
    assert not [s for s in secrets if s in report]  # the report's examples are masked too
