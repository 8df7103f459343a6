"""A gs:// workdir, on the stand-in bucket of tests/fake_gcs.py: a run writes every workdir file
there (none locally) and a second run resumes from it."""

import json
import os
import pathlib

import fsspec
import pytest

from llmjax import paths
from llmjax.train import train_and_evaluate
from llmjax.validate import validate_config
from tests import fake_gcs
from tests.helpers import tiny_config

WORKDIR = "gs://llmjax-test/runs/tiny"


@pytest.fixture
def bucket(tmp_path):
    """The local folder behind gs://, while the stand-in serves it."""
    root = tmp_path / "gcs"
    root.mkdir()
    with fake_gcs.serve(str(root)):
        yield root


def loop_config(**overrides):
    return tiny_config("llama", **{
        "model.vocab_size": 512, "total_steps": 6, "log_every_steps": 1, "eval_every_steps": 3,
        "eval_steps": 1, "checkpoint_every_steps": 3, "sample.max_new_tokens": 0, "batch_size": 8,
        "seq_len": 32, "model.max_len": 64, "mesh.shape": (-1, 1, 1), **overrides})


def records(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_remote_run_writes_and_resumes(devices, tokenizer_path, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory either
    (bucket / "llmjax-test" / "tok").mkdir(parents=True)
    (bucket / "llmjax-test" / "tok" / "tokenizer.model").write_bytes(
        pathlib.Path(tokenizer_path).read_bytes())
    # The run reads its tokenizer from the bucket too; training one into a gs:// workdir is the
    # next test (kept apart: training takes longer than this whole run).
    config = lambda **o: loop_config(**{"data.tokenizer": "gs://llmjax-test/tok/tokenizer.model",
                                        **o})
    before = set(os.listdir(tmp_path))
    train_and_evaluate(config(stop_at_step=3), WORKDIR)
    run = bucket / "llmjax-test" / "runs" / "tiny"
    assert sorted(os.listdir(run / "checkpoints")) == ["3"]
    # Orbax took its gs:// branch: a step is committed by a marker file, not by a rename.
    assert (run / "checkpoints" / "3" / "commit_success.txt").exists()
    first = records((run / "metrics.jsonl").read_text())
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3]

    train_and_evaluate(config(), WORKDIR)  # resumes at step 3
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
    both = records((run / "metrics.jsonl").read_text())
    assert both[:len(first)] == first  # the file was continued, not replaced
    assert [r["step"] for r in both if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "data_spec.json").read_text())["tokenizer_vocab_size"] == 512
    events = [f for f in os.listdir(run / "tb") if f.startswith("events.out.tfevents")]
    assert len(events) == 2 and all(b"loss" in (run / "tb" / f).read_bytes() for f in events)

    assert set(os.listdir(tmp_path)) == before  # nothing local: "gcs" is the bucket's folder


def test_tokenizer_is_trained_into_and_reloaded_from_a_remote_workdir(bucket):
    from llmjax import data as data_lib
    cfg = tiny_config(**{"data.tokenizer_train_chars": 20_000}).data
    trained = data_lib.load_or_train_tokenizer(cfg, 512, WORKDIR)
    assert (bucket / "llmjax-test" / "runs" / "tiny" / "tokenizer.model").is_file()
    again = data_lib.load_or_train_tokenizer(cfg, 512, WORKDIR)  # read back, not retrained
    assert again.encode("hello world") == trained.encode("hello world")


def test_growing_remote_file_uploads_on_a_schedule_and_on_close(bucket, monkeypatch):
    target = bucket / "llmjax-test" / "log.jsonl"
    monkeypatch.setattr(paths, "UPLOAD_EVERY_S", 3600.0)
    f = paths.open_append("gs://llmjax-test/log.jsonl")
    f.write("a\n")
    f.flush()
    assert not target.exists()  # not due yet: each upload rewrites the whole object
    f.close()
    assert target.read_text() == "a\n"
    monkeypatch.setattr(paths, "UPLOAD_EVERY_S", 0.0)
    f = paths.open_append("gs://llmjax-test/log.jsonl")  # a resumed run continues the object
    f.write("b\n")
    f.flush()
    assert target.read_text() == "a\nb\n"
    f.close()


def test_bad_remote_workdirs_are_one_sentence(bucket, monkeypatch):
    paths.path("gs://llmjax-test/a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        validate_config(tiny_config(), "gs://llmjax-test/a_file")
    with pytest.raises(ValueError, match="only remote paths supported are gs://"):
        validate_config(tiny_config(), "s3://bucket/run")

    def no_gcsfs(protocol):
        raise ImportError("Install gcsfs to access Google Storage")
    monkeypatch.setattr(fsspec, "get_filesystem_class", no_gcsfs)
    with pytest.raises(ValueError, match="--workdir=gs://llmjax-test/runs/tiny needs gcsfs"):
        validate_config(tiny_config(), WORKDIR)
    with pytest.raises(ValueError, match="data.tokenizer=gs://llmjax-test/t.model needs gcsfs"):
        validate_config(tiny_config(**{"data.tokenizer": "gs://llmjax-test/t.model"}))
    assert not (bucket / "llmjax-test" / "runs").exists()  # a bad config writes nothing


@pytest.mark.parametrize("fmt", ["jsonl.gz", "parquet", "txt"])
def test_corpus_files_read_from_the_bucket(bucket, fmt):
    """data.files on gs://: globbed and read lazily through epath, as local files are."""
    from llmjax.data import readers
    from tests.test_prepare import TEXTS, _write
    local = bucket / "llmjax-test" / "corpus"
    local.mkdir(parents=True)
    if fmt == "txt":
        for i, t in enumerate(TEXTS[:5]):
            (local / f"d{i}.txt").write_text(t)
        expected = TEXTS[:5]
    else:
        _write(local / f"a.{fmt}", TEXTS[:20], fmt)
        _write(local / f"b.{fmt}", TEXTS[20:], fmt)
        expected = TEXTS
    files = readers.expand(f"gs://llmjax-test/corpus/*.{fmt}")
    assert files and all(f.startswith("gs://llmjax-test/corpus/") for f in files)
    assert [t for f in files for t in readers.read_texts(f)] == expected
    # Two processes split the files between them and together read every record once.
    halves = [[r[-1] for r in readers.read_shard(files, i, 2)] for i in range(2)]  # (file, i, text)
    assert sorted(halves[0] + halves[1]) == sorted(expected)
