"""Reading the texts of corpus files lazily, whatever format they were published in.

A file's format follows from its name:
  * `.jsonl` / `.ndjson` / `.json` (also `.gz` / `.zst` compressed): one record per non-blank line, the text
    under the key `text_key` (data.text_key);
  * `.parquet` (what Hugging Face datasets publish): the `text_key` column, read one row group at a
    time;
  * `.arrow` or a directory written by `datasets`' `save_to_disk` (Arrow IPC stream files plus
    state.json): the `text_key` column, one record batch at a time, with pyarrow alone;
  * anything else (`.txt`, `.md`, `.py`, ... also `.gz` / `.zst` compressed): one document per file.

Nothing loads a whole big file: records come from generators over a stream. Paths may be local or
gs:// (through etils epath). `shard` splits a list of files over processes: process i of n takes
files i::n, or, with fewer files than processes, every n-th record of every file.
"""

from __future__ import annotations

import glob as glob_lib
import io
import itertools
import json
import os
from collections.abc import Iterator, Sequence

from etils import epath

# .json too: the .json(.gz) files of C4 and of most Hugging Face datasets are JSON Lines.
RECORD_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = (".gz", ".zst")
# Containers and compressions we cannot read; a file named so is an error, not garbled text.
UNSUPPORTED = (".bz2", ".xz", ".lzma", ".lz4", ".br", ".zip", ".tar", ".tgz", ".7z", ".rar",
               ".csv", ".tfrecord", ".feather", ".orc", ".avro", ".pkl", ".npy")
_BATCH_ROWS = 1024  # rows per pyarrow batch: bounded memory whatever the row group size


def is_remote(path: str) -> bool:
    return "://" in path


def _path(path: str) -> epath.Path:
    return epath.Path(path if is_remote(path) else os.path.abspath(os.path.expanduser(path)))


def format_of(path: str) -> str:
    """"jsonl", "parquet", "arrow" (file or save_to_disk dir) or "text"; ValueError if unreadable."""
    p = _path(path)
    if p.is_dir():
        if (p / "state.json").exists():
            return "arrow"
        raise ValueError(f"{path} is a directory but not a `datasets` save_to_disk directory (it "
                         "has no state.json); point data.files at its files instead.")
    name = p.name.lower()
    base = name[: -len(c)] if (c := _compression(name)) else name
    if base.endswith(RECORD_SUFFIXES):
        return "jsonl"
    if base.endswith(".parquet") and not c:
        return "parquet"
    if base.endswith(".arrow") and not c:
        return "arrow"
    if name.endswith(UNSUPPORTED) or base.endswith((".parquet", ".arrow")):
        raise ValueError(f"{path} has a format llmjax cannot read ({os.path.splitext(name)[1]}); "
                         "give text, JSONL, Parquet or Arrow files, optionally .gz or .zst compressed.")
    return "text"


def is_record_format(path: str) -> bool:
    """Whether the file holds many documents (one per record) rather than being one document."""
    return format_of(path) != "text"


def read_texts(path: str, text_key: str = "text") -> Iterator[str]:
    """The texts of the file's records, in order (a text file: its whole content, once). A file
    that is damaged (a truncated or corrupt archive, a Parquet or Arrow file that does not parse)
    is a ValueError naming it."""
    try:
        yield from _read_texts(path, text_key)
    except ValueError as e:
        if str(e).startswith(path):  # already says which file and what to do
            raise
        raise ValueError(_unreadable(path, e)) from None
    except (OSError, EOFError) as e:
        raise ValueError(_unreadable(path, e)) from None
    except Exception as e:  # noqa: BLE001 - zstandard.ZstdError, pyarrow.ArrowInvalid, ...
        if type(e).__module__.split(".")[0] in ("zstandard", "pyarrow", "_zstd"):
            raise ValueError(_unreadable(path, e)) from None
        raise


def _unreadable(path: str, error: BaseException) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{path} cannot be read as {format_of(path)}{_compression(path.lower())} "
            f"({type(error).__name__}: {reason[:160]}); the file is damaged or not what its name "
            "says: fix or remove it, or narrow data.files.")


def _read_texts(path: str, text_key: str) -> Iterator[str]:
    fmt = format_of(path)
    if fmt == "jsonl":
        yield from _jsonl_texts(path, text_key)
    elif fmt == "parquet":
        yield from _parquet_texts(path, text_key)
    elif fmt == "arrow":
        yield from _arrow_texts(path, text_key)
    else:
        with _open(path) as f:
            # errors="replace": one stray byte must not stop a build of thousands of files.
            # Universal newlines, as open() reads a plain file: "\r\n" becomes "\n".
            yield io.TextIOWrapper(f, encoding="utf-8", errors="replace").read()


def count_records(path: str, text_key: str = "text") -> int:
    """How many texts `read_texts` yields (Parquet: from the footer; others: one pass)."""
    fmt = format_of(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
        with _path(path).open("rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    if fmt == "arrow":
        return sum(b.num_rows for f in _arrow_files(path) for b in _arrow_batches(f, None))
    if fmt == "jsonl":
        with _open(path) as f:
            return sum(1 for line in f if line.strip())
    return 1


def expand(patterns: str | Sequence[str]) -> list[str]:
    """The sorted files (and save_to_disk directories) matched by comma-separated globs.

    A glob that matches nothing is an error naming it. `**` recurses; gs:// globs go through epath.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise ValueError("data.files is empty; set it to a glob of corpus files, e.g. "
                         "'corpus/**/*.jsonl'.")
    matched = set()
    for pattern in patterns:
        hits = _glob(pattern)
        # The files inside a save_to_disk directory belong to it, not to the corpus on their own.
        hits = [h for h in hits if _path(h).is_dir() and (_path(h) / "state.json").exists()
                or _path(h).is_file() and not _inside_saved_dataset(h)]
        if not hits:
            raise ValueError(
                f"The glob {pattern!r} in data.files matches no files; fix the pattern or the "
                "working directory (use an absolute path, and '**' to match subdirectories).")
        matched.update(hits)
    return sorted(matched)


def shard(files: Sequence[str], index: int, count: int) -> tuple[list[str], int, int]:
    """(files, record_index, record_count) that process `index` of `count` reads.

    With at least `count` files, the process reads files index::count whole (record stride 1);
    with fewer, it reads every file but only records index::count of each, so every record is
    read by exactly one process either way.
    """
    if not 0 <= index < count:
        raise ValueError(f"process index must be in [0, {count}), got {index}.")
    if len(files) >= count:
        return list(files[index::count]), 0, 1
    return list(files), index, count


def read_shard(files: Sequence[str], index: int, count: int,
               text_key: str = "text") -> Iterator[tuple[str, int, str]]:
    """(file, record number, text) for every record process `index` of `count` reads."""
    mine, start, stride = shard(files, index, count)
    for path in mine:
        records = itertools.islice(read_texts(path, text_key), start, None, stride)
        for i, text in zip(itertools.count(start, stride), records):
            yield path, i, text


# ------------------------------------------------------------------------------------------------


def _compression(name: str) -> str:
    return next((c for c in COMPRESSIONS if name.endswith(c)), "")


def _open(path: str):
    """A binary stream of the file's bytes, decompressed on the fly for .gz / .zst."""
    raw = _path(path).open("rb")
    c = _compression(path.lower())
    if c == ".gz":
        import gzip  # pylint: disable=g-import-not-at-top
        return gzip.GzipFile(fileobj=raw)
    if c == ".zst":
        return io.BufferedReader(_ZstdReader(raw))
    return raw


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst stream of one or more frames; a stream that ends inside a frame (a
    truncated copy) is an EOFError, where zstandard's stream_reader would end quietly."""

    def __init__(self, raw, chunk: int = 1 << 20):
        import zstandard  # pylint: disable=g-import-not-at-top
        self._zstd, self._raw, self._chunk = zstandard, raw, chunk
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._pos, self._started = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._pending):
            self._pending, self._pos = b"", 0
            data = self._raw.read(self._chunk)
            if not data:
                if self._started and not self._frame.eof:
                    raise EOFError("the zstd stream ends in the middle of a frame (truncated)")
                return 0
            while data:
                if self._frame.eof:  # the next frame of a multi-frame file
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._started = True
                self._pending += self._frame.decompress(data)
                data = self._frame.unused_data if self._frame.eof else b""
        n = min(len(buffer), len(self._pending) - self._pos)
        buffer[:n] = memoryview(self._pending)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self):
        self._raw.close()
        super().close()


def _jsonl_texts(path: str, text_key: str) -> Iterator[str]:
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not JSON ({e.msg}); JSONL files hold "
                                 "one JSON object per line.") from None
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path} line {lineno} has no field {text_key!r} (it has {keys}); "
                                 "set data.text_key to the field that holds the text.")
            yield str(record[text_key])


def _parquet_texts(path: str, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with _path(path).open("rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_key not in names:
            raise ValueError(f"{path} has no column {text_key!r} (it has {names}); set "
                             "data.text_key to the column that holds the text.")
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_key]):
            yield from (t if t is not None else "" for t in batch.column(0).to_pylist())


def _arrow_files(path: str) -> list[str]:
    p = _path(path)
    if not p.is_dir():
        return [path]
    state = json.loads((p / "state.json").read_text())
    return [os.fspath(p / f["filename"]) for f in state.get("_data_files", [])]


def _arrow_batches(path: str, text_key: str | None):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    with _path(path).open("rb") as f:
        reader = pa.ipc.open_stream(f)
        if text_key is not None and text_key not in reader.schema.names:
            raise ValueError(f"{path} has no column {text_key!r} (it has {reader.schema.names}); "
                             "set data.text_key to the column that holds the text.")
        for batch in reader:
            yield batch if text_key is None else batch.column(text_key)


def _arrow_texts(path: str, text_key: str) -> Iterator[str]:
    for file in _arrow_files(path):
        for column in _arrow_batches(file, text_key):
            yield from (t if t is not None else "" for t in column.to_pylist())


def _glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        scheme, _, rest = pattern.partition("://")
        bucket, _, inner = rest.partition("/")
        root = epath.Path(f"{scheme}://{bucket}")
        return [os.fspath(p) for p in root.glob(inner)] if any(c in inner for c in "*?[") else (
            [pattern] if epath.Path(pattern).exists() else [])
    return [os.path.abspath(f) for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)]


def _inside_saved_dataset(path: str) -> bool:
    return (_path(path).parent / "state.json").exists()
