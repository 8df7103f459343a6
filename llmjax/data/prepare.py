"""Prepare a corpus once: read, clean, deduplicate, tokenize, write array_record shards.

    python -m llmjax.data.prepare --config=configs/gpt_small.py --out=DIR \
        [--config.data.name=text --config.data.files='corpus/*.parquet'] [--processes=N]

Train on the result with `--config.data.name=prepared --config.data.data_dir=DIR`.

What DIR holds:
  manifest.json   sources (size, sha256), shards, documents and tokens per split, the tokenizer's
                  sha256, the hygiene report, the llmjax version and the config; `complete` is
                  false until the last step, so a half-prepared DIR is never read.
  tokenizer.model the config's data.tokenizer, or one trained as training would (same settings,
                  a sample of the corpus), copied here so DIR is self-contained.
  shards/         one array_record file per task, a record per kept document: its token ids
                  (little-endian uint16 or uint32, no bos/eos), plus a sidecar with each record's
                  name, token count and hygiene result; the sidecar is written last and marks the
                  shard complete.
  index-<split>.npy  the split's documents, as record numbers over the shards in order.

Documents, not packed rows, are stored: the training pipeline then runs exactly as on text (shuffle
documents, pack by concat-then-split, window-shuffle rows, batch) minus the tokenizing, so a
prepared corpus gives the very batches of the on-the-fly pipeline (same order, same tokenizer)
and any seq_len or objective can read it. Each split's index lists documents in the order TFDS
stores the on-the-fly corpus (sorted by the MD5 of the split name and the document name).

Parallelism: T tasks (--shards), each reading its share of the documents (whole files i::T, or with
fewer files than tasks every T-th record), cleaning (hygiene.process_document), tokenizing and
writing one shard, run in --processes worker processes. Deduplication, the train/validation split
and the indexes are one serial pass over the sidecars afterwards. Interrupted, the same command
resumes: complete shards are kept, the others rewritten; a different tokenizer or corpus is refused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import pickle
import sys
import time
from typing import Any

import numpy as np

from llmjax.data import documents as documents_lib
from llmjax.data import readers
from llmjax.data.tokenizer import Tokenizer

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("validation", "train")  # deduplication order: a training copy of a validation doc goes


# ------------------------------------------------------------------------------------------------
# Planning: which documents, which tasks, which tokenizer.


def corpus_documents(data_cfg) -> list[documents_lib.Document]:
    """The corpus as file-level Documents (a record file is one Document yielding its records)."""
    name = data_cfg.get("name", "stdlib")
    if name == "stdlib":
        return documents_lib.stdlib_documents()
    if name == "text":
        return documents_lib.file_documents(data_cfg.get("files", ""),
                                            data_cfg.get("text_key", "text"), records=False)
    raise ValueError(f"prepare reads data.name='stdlib' or 'text' (with data.files), not "
                     f"{name!r}; set --config.data.name=text and data.files to the corpus files.")


def task_documents(docs, task: int, tasks: int):
    """(documents, first record, record stride) of one task: readers.shard over documents."""
    return readers.shard(docs, task, tasks)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with readers._path(path).open("rb") as f:  # pylint: disable=protected-access
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _shard_name(task: int, tasks: int) -> str:
    return f"shards/tokens-{task:05d}-of-{tasks:05d}.array_record"


# ------------------------------------------------------------------------------------------------
# The worker: one task, one shard.


@dataclasses.dataclass
class _Task:
    index: int
    count: int
    docs: list
    out: str
    tokenizer: Tokenizer
    hygiene: Any  # HygieneConfig, or None to keep every document as it is


def _run_task(task: _Task) -> dict:
    """Reads, cleans and tokenizes the task's documents and writes its shard atomically."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    docs, start, stride = task_documents(task.docs, task.index, task.count)
    name = _shard_name(task.index, task.count)
    path = os.path.join(task.out, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    dtype = _dtype(task.tokenizer.vocab_size)
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    records, sources = [], {}
    for doc in docs:
        if doc.file is not None and (stride == 1 or task.index == 0):
            sources[doc.path] = {"size": doc.size, "sha256": sha256_file(doc.file)}
        for key, text in itertools.islice(doc.texts(), start, None, stride):
            result, rule = None, None
            if task.hygiene is not None:
                from llmjax.data import hygiene  # pylint: disable=g-import-not-at-top
                result = hygiene.process_document(text, task.hygiene)
                rule = _quality_rule(result, task.hygiene)
                text = result.text
            if rule is None:
                ids = np.asarray(task.tokenizer.encode(text), dtype=dtype)
                writer.write(ids.astype(ids.dtype.newbyteorder("<")).tobytes())
                tokens = len(ids)
            else:
                tokens = 0
            records.append({"key": key, "tokens": tokens, "written": rule is None,
                            "rule": rule, "result": result})
    writer.close()
    os.replace(tmp, path)
    meta = {"shard": name, "records": records, "sources": sources,
            "sha256": sha256_file(path)}
    # The sidecar is written last: its presence is what marks the shard complete.
    _write_atomically(path + ".meta.pkl", pickle.dumps(meta))
    return meta


def _quality_rule(result, cfg) -> str | None:
    """hygiene.QUALITY_RULE if data.hygiene.quality_filter='drop' removes the document, else None."""
    from llmjax.data import hygiene  # pylint: disable=g-import-not-at-top
    return hygiene.QUALITY_RULE if cfg.quality_filter == "drop" and result.quality_flags else None


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The driver.


def prepare(config, out: str, *, processes: int = 0, shards: int = 16, log=print) -> dict:
    """Prepares the corpus of `config.data` into `out` (resuming there); returns the manifest."""
    data_cfg = config.data
    out = os.path.abspath(os.path.expanduser(out))
    if readers.is_remote(out):
        raise ValueError(f"--out={out}: prepare writes to a local directory; copy it to gs:// after.")
    start = time.perf_counter()
    docs = corpus_documents(data_cfg)
    if not docs:
        raise ValueError("The corpus has no documents; check data.name and data.files.")
    tasks = max(1, shards)
    hygiene_cfg = _hygiene_config(config)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    tokenizer = _tokenizer(config, out, docs, hygiene_cfg)
    sha = hashlib.sha256(tokenizer._proto).hexdigest()  # pylint: disable=protected-access
    plan = {"format": FORMAT, "documents": documents_lib.fingerprint(
                docs, data_cfg.get("text_key", "text")),
            "shards": tasks, "tokenizer_sha256": sha,
            "hygiene": hygiene_cfg.cache_key(),
            "validation_fraction": float(data_cfg.get("validation_fraction", 0.02))}
    plan = json.loads(json.dumps(plan))  # as the manifest stores it (tuples become lists)
    _check_resume(out, plan)
    manifest_path = os.path.join(out, MANIFEST)
    _write_json(manifest_path, {"complete": False, "plan": plan})

    metas: dict[int, dict] = {}
    todo = []
    for t in range(tasks):
        meta_path = os.path.join(out, _shard_name(t, tasks) + ".meta.pkl")
        if os.path.exists(meta_path) and os.path.exists(meta_path[: -len(".meta.pkl")]):
            with open(meta_path, "rb") as f:
                metas[t] = pickle.load(f)
        else:
            todo.append(_Task(t, tasks, docs, out, tokenizer, hygiene_cfg))
    if metas:
        log(f"resuming: {len(metas)} of {tasks} shards already complete")
    processes = processes or os.cpu_count() or 1
    if todo:
        if processes == 1 or len(todo) == 1:
            for task in todo:
                metas[task.index] = _run_task(task)
        else:
            # spawn: the workers start clean (no inherited JAX or Grain threads to fork).
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(processes, len(todo)),
                                                        mp_context=ctx) as pool:
                for meta in pool.map(_run_task, todo):
                    metas[int(meta["shard"].split("-")[1])] = meta
    manifest = _finish(config, out, [metas[t] for t in range(tasks)], docs, tokenizer, sha,
                       plan, hygiene_cfg)
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    _write_json(manifest_path, manifest)
    return manifest


def _finish(config, out, metas, docs, tokenizer, sha, plan, hygiene_cfg) -> dict:
    """The serial pass: splits, deduplication (validation first), indexes, report, manifest."""
    data_cfg = config.data
    records, offset = [], 0
    for meta in metas:
        written = 0
        for r in meta["records"]:
            records.append((r, offset + written if r["written"] else -1))
            written += r["written"]
        offset += written
    # The documents in listing order (the order the on-the-fly corpus offers them to hygiene).
    position = {d.path: i for i, d in enumerate(docs)}
    records.sort(key=lambda rw: _listing_order(rw[0]["key"], position))
    keys = [r["key"] for r, _ in records]
    held = documents_lib.held_out_keys(keys, plan["validation_fraction"])
    report, dedup = None, None
    if hygiene_cfg is not None:
        from llmjax.data import hygiene  # pylint: disable=g-import-not-at-top
        report, dedup = hygiene.Report(hygiene_cfg.to_dict()), hygiene.Deduplicator(hygiene_cfg)
    splits = {}
    for split in SPLITS:
        kept = []
        for r, number in records:
            if (r["key"] in held) != (split == "validation"):
                continue
            rule = r["rule"]
            match = None
            if rule is None and dedup is not None and hygiene_cfg.enabled:
                rule = dedup.add(r["key"], r["result"], split)
                match = dedup.last_match
            if report is not None:
                report.add(r["key"], split, r["result"], rule, tokens=r["tokens"],
                           duplicate_of=match)
            if rule is None:
                kept.append((r["key"], number, r["tokens"]))
        # TFDS's order for the on-the-fly corpus: by MD5 of (split name salt, document name).
        from tensorflow_datasets.core import hashing  # pylint: disable=g-import-not-at-top
        hasher = hashing.Hasher(split)
        kept.sort(key=lambda k: hasher.hash_key(k[0]))
        index = np.asarray([n for _, n, _ in kept], dtype=np.int64)
        with open(os.path.join(out, f"index-{split}.npy.tmp"), "wb") as f:
            np.save(f, index)
        os.replace(os.path.join(out, f"index-{split}.npy.tmp"), os.path.join(out, f"index-{split}.npy"))
        splits[split] = {"documents": len(kept), "tokens": int(sum(t for _, _, t in kept)),
                         "index": f"index-{split}.npy"}
    sources = {}
    for meta in metas:
        sources.update(meta["sources"])
    return {
        "complete": True,
        "format": FORMAT,
        "llmjax_version": _version(),
        "plan": plan,
        "tokenizer": {"file": TOKENIZER, "sha256": sha, "vocab_size": tokenizer.vocab_size},
        "dtype": _dtype(tokenizer.vocab_size),
        "seq_len": int(config.get("seq_len", 0)),
        "splits": {s: splits[s] for s in ("train", "validation")},
        "documents_read": len(records),
        "shards": [{"file": m["shard"], "records": sum(r["written"] for r in m["records"]),
                    "sha256": m["sha256"]} for m in metas],
        "sources": [{"path": p, **v} for p, v in sorted(sources.items())],
        "hygiene": report.to_dict() if report is not None else None,
        "hygiene_summary": report.summary_lines() if report is not None else None,
        "config": json.loads(config.to_json_best_effort()),
    }


def _listing_order(key: str, position: dict[str, int]) -> tuple[int, int]:
    if key in position:
        return position[key], 0
    path, _, record = key.rpartition("#")
    return position[path], int(record)


def _hygiene_config(config):
    """data.hygiene's settings (the same ones the on-the-fly corpus applies)."""
    from llmjax.data import hygiene  # pylint: disable=g-import-not-at-top
    return hygiene.HygieneConfig.from_config(config.data.get("hygiene", None))


def _tokenizer(config, out, docs, hygiene_cfg) -> Tokenizer:
    """data.tokenizer, else DIR/tokenizer.model from an earlier attempt, else a new one."""
    from llmjax.data import objectives  # pylint: disable=g-import-not-at-top
    from llmjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    path = os.path.join(out, TOKENIZER)
    if given := config.data.get("tokenizer", ""):
        tok = Tokenizer.load(given)
        if os.path.exists(path) and Tokenizer.load(path)._proto != tok._proto:  # pylint: disable=protected-access
            raise ValueError(f"data.tokenizer={given} differs from the tokenizer {out} was "
                             "prepared with; prepare into a new --out or drop data.tokenizer.")
        if not os.path.exists(path):
            _write_atomically(path, tok._proto)  # pylint: disable=protected-access
        return tok
    if os.path.exists(path):
        return Tokenizer.load(path)
    max_chars = int(config.data.get("tokenizer_train_chars", tokenizer_lib.DEFAULT_TRAIN_CHARS))

    def sample():
        # Documents in a fixed pseudo-random order, as load_or_train_tokenizer samples its corpus.
        for i in np.random.default_rng(0).permutation(len(docs)):
            for _, text in docs[int(i)].texts():
                if hygiene_cfg is not None:
                    from llmjax.data import hygiene  # pylint: disable=g-import-not-at-top
                    text = hygiene.process_document(text, hygiene_cfg).text
                yield text

    return tokenizer_lib.train_tokenizer(sample(), config.model.vocab_size, path,
                                         max_chars=max_chars,
                                         reserved=objectives.reserved_pieces(config.data))


def _check_resume(out: str, plan: dict) -> None:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f).get("plan", {})
    if previous.get("tokenizer_sha256") not in (None, plan["tokenizer_sha256"]):
        raise ValueError(f"{out} was prepared with another tokenizer (sha256 "
                         f"{previous['tokenizer_sha256'][:12]}, now {plan['tokenizer_sha256'][:12]}); "
                         "prepare into a new --out.")
    changed = sorted(k for k in plan if previous.get(k) != plan[k])
    if changed:
        raise ValueError(f"{out} holds a preparation of another corpus or settings ("
                         f"{', '.join(changed)} changed); prepare into a new --out.")


def _write_json(path: str, obj: dict) -> None:
    _write_atomically(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def _version() -> str:
    try:
        return importlib.metadata.version("llmjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Reading a prepared directory.


def load_manifest(data_dir: str) -> dict:
    """The manifest of a complete preparation; ValueError (one sentence) otherwise."""
    if not data_dir:
        raise ValueError("data.name='prepared' reads the directory data.data_dir, which is not "
                         "set; set --config.data.data_dir to a `python -m llmjax.data.prepare` --out.")
    path = readers._path(data_dir) / MANIFEST  # pylint: disable=protected-access
    if not path.exists():
        raise ValueError(f"data.data_dir={data_dir} has no {MANIFEST}; prepare it first with "
                         f"`python -m llmjax.data.prepare --config=... --out={data_dir}`.")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise ValueError(f"The preparation in {data_dir} was interrupted; run the same "
                         "`python -m llmjax.data.prepare` command again to finish it.")
    return manifest


def check_tokenizer(data_dir: str, tokenizer: Tokenizer) -> None:
    """Refuses a tokenizer other than the one the prepared token ids were made with."""
    manifest = load_manifest(data_dir)
    sha = hashlib.sha256(tokenizer._proto).hexdigest()  # pylint: disable=protected-access
    if sha != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"The tokenizer {tokenizer.path or '(in memory)'} (sha256 {sha[:12]}) is "
                         f"not the one {data_dir} was prepared with "
                         f"({manifest['tokenizer']['sha256'][:12]}); use {data_dir}/{TOKENIZER} "
                         "(leave data.tokenizer empty and use a new --workdir).")


def load_tokenizer(data_dir: str) -> Tokenizer:
    load_manifest(data_dir)
    tok = Tokenizer.load(os.fspath(readers._path(data_dir) / TOKENIZER))  # pylint: disable=protected-access
    check_tokenizer(data_dir, tok)
    return tok


class PreparedSource:
    """The documents of one split of a prepared directory, as int32 token-id arrays (random
    access, for grain.MapDataset.source); picklable, so Grain worker processes can read it."""

    def __init__(self, data_dir: str, split: str):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"{data_dir} has no split {split!r} (it has "
                             f"{sorted(manifest['splits'])}); set data.split_train/split_eval.")
        root = readers._path(data_dir)  # pylint: disable=protected-access
        self._paths = [os.fspath(root / s["file"]) for s in manifest["shards"] if s["records"]]
        self._dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        with (root / manifest["splits"][split]["index"]).open("rb") as f:
            self._index = np.load(f)
        self._source = None

    def _records(self):
        if self._source is None:
            import grain  # pylint: disable=g-import-not-at-top
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        return self._source

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._decode(self._records()[int(self._index[i])])

    def __getitems__(self, indices) -> list[np.ndarray]:
        return [self._decode(r) for r in
                self._records().__getitems__([int(self._index[i]) for i in indices])]

    def _decode(self, record: bytes) -> np.ndarray:
        return np.frombuffer(record, dtype=self._dtype).astype(np.int32)

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"PreparedSource({len(self)} documents in {len(self._paths)} shards)"


# ------------------------------------------------------------------------------------------------


def main(argv):
    del argv
    from llmjax import cli  # pylint: disable=g-import-not-at-top
    config = cli.require_config()
    try:
        manifest = prepare(config, _OUT.value, processes=_PROCESSES.value, shards=_SHARDS.value)
    except ValueError as e:
        cli.fail(str(e))
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    print(f"prepared {manifest['documents_read']} documents into {_OUT.value} in "
          f"{manifest['seconds']:.1f}s ({tokens / max(manifest['seconds'], 1e-9):,.0f} tokens/s): "
          + ", ".join(f"{s} {v['documents']} documents / {v['tokens']:,} tokens"
                      for s, v in manifest["splits"].items()))
    for line in manifest.get("hygiene_summary") or ():
        print(f"  {line}")
    sys.stdout.flush()


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=g-import-not-at-top
    from llmjax import cli  # pylint: disable=g-import-not-at-top
    _OUT = flags.DEFINE_string("out", None, "Directory to prepare into (resumed if it exists).",
                               required=True)
    _PROCESSES = flags.DEFINE_integer("processes", 0, "Worker processes (0: one per CPU).")
    _SHARDS = flags.DEFINE_integer("shards", 16, "Shards (tasks) to write; fixed per --out.")
    app.run(main, flags_parser=cli.parse_flags)
