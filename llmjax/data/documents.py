"""Finding the documents of a local corpus and deciding which ones are held out.

A document is one text file (or one pydoc topic), or one record of a file that holds many
(JSONL, Parquet, Arrow; see readers.py), named `<file>#<record number>`. Listing plain files is
cheap (a directory walk and `stat` calls, no reading) so the corpus can compute its cache key on
every run; a record file is counted once per listing (Parquet: from its footer), which is why
corpora of big record files are better prepared once (llmjax/data/prepare.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

from llmjax.data import readers

# Directories of the standard library that are not "the library": test suites (huge and
# repetitive), IDLE, third-party packages and bytecode caches.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)
# pydoc_data/topics.py is the repr of the topics dict that we add topic by topic; the sysconfig
# data and the config-* dir describe how this interpreter was compiled, not Python.
_STDLIB_SKIP_FILES = ("pydoc_data/topics.py",)
_STDLIB_SKIP_PREFIXES = ("_sysconfigdata", "config-")

PYDOC_PREFIX = "pydoc_data/topics/"


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: `path` is its stable name (also its TFDS key), `file` where to read it.

  `record` >= 0 names one record of a record file (JSONL, Parquet, Arrow), whose text is the
  field `text_key`; -1 means the whole file is the document.
  """

  path: str
  file: str | None = None  # None: the text is a pydoc topic named by `path`.
  size: int = 0
  mtime_ns: int = 0
  record: int = -1
  text_key: str = "text"

  def read(self) -> str:
    if self.file is None:
      import pydoc_data.topics  # pylint: disable=g-import-not-at-top

      return pydoc_data.topics.topics[self.path[len(PYDOC_PREFIX) :]]
    if self.record >= 0:
      return _RECORDS.read(self.file, self.record, self.text_key)
    if readers.is_remote(self.file) or readers.format_of(self.file) != "text" or (
        self.file.endswith(readers.COMPRESSIONS)):
      return next(readers.read_texts(self.file, self.text_key))
    # errors="replace": one stray byte must not stop a build of thousands of files.
    with open(self.file, encoding="utf-8", errors="replace") as f:
      return f.read()

  def texts(self) -> Iterator[tuple[str, str]]:
    """(key, text) of this document, or of every record of its file when it stands for the
    whole record file (see `file_documents(..., records=False)`), in the keys the corpus uses."""
    if self.file is None or self.record >= 0 or not readers.is_record_format(self.file):
      yield self.path, self.read()
      return
    for i, text in enumerate(readers.read_texts(self.file, self.text_key)):
      yield record_key(self.path, i), text


def record_key(path: str, index: int) -> str:
  """The name of record `index` of the record file named `path`."""
  return f"{path}#{index}"


class _RecordCursor:
  """Reads records of one file in increasing order with one open stream, so a corpus build that
  asks for records 0, 1, 2, ... (skipping held-out ones) reads the file once, not once a record."""

  def __init__(self):
    self._key, self._it, self._next = None, None, 0

  def read(self, file: str, index: int, text_key: str) -> str:
    if self._key != (file, text_key) or index < self._next:
      self._key, self._it, self._next = (file, text_key), readers.read_texts(file, text_key), 0
    for _ in range(index - self._next):
      next(self._it)
    self._next = index + 1
    return next(self._it)


_RECORDS = _RecordCursor()


def stdlib_documents() -> list[Document]:
  """The running interpreter's standard-library sources plus the pydoc topics."""
  root = sysconfig.get_paths()["stdlib"]
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    # Pruning in place stops os.walk from descending into skipped trees.
    dirnames[:] = sorted(
        d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(_STDLIB_SKIP_PREFIXES)
    )
    for name in sorted(filenames):
      rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
      if not name.endswith(".py") or rel in _STDLIB_SKIP_FILES or name.startswith(_STDLIB_SKIP_PREFIXES):
        continue
      docs.append(_file_document(rel, os.path.join(dirpath, name)))
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top

  for topic, text in sorted(pydoc_data.topics.topics.items()):
    docs.append(Document(path=PYDOC_PREFIX + topic, size=len(text)))
  return docs


def file_documents(files: str, text_key: str = "text", *, records: bool = True) -> list[Document]:
  """Documents for `files`: one glob or several separated by commas (`**` recurses).

  A record file (JSONL, Parquet, Arrow) gives one Document per record (counting them reads it),
  or with `records=False` one Document for the whole file, whose `texts()` yields its records.
  """
  files_sorted = readers.expand(files)
  # Names relative to the common directory keep the held-out choice stable when the corpus moves.
  root = _common_root(files_sorted)
  docs = []
  for f in files_sorted:
    doc = _file_document(_relative(f, root), f, text_key)
    if records and readers.is_record_format(f):
      docs.extend(dataclasses.replace(doc, path=record_key(doc.path, i), record=i)
                  for i in range(readers.count_records(f, text_key)))
    else:
      docs.append(doc)
  return docs


def _common_root(files: list[str]) -> str:
  if any(readers.is_remote(f) for f in files):
    return os.path.commonprefix([f.rsplit("/", 1)[0] + "/" for f in files]).rsplit("/", 1)[0]
  return os.path.commonpath([os.path.dirname(f) for f in files])


def _relative(file: str, root: str) -> str:
  if readers.is_remote(file):
    return file[len(root):].lstrip("/")
  return os.path.relpath(file, root).replace(os.sep, "/")


def _file_document(path: str, file: str, text_key: str = "text") -> Document:
  if readers.is_remote(file):
    from etils import epath  # pylint: disable=g-import-not-at-top
    st = epath.Path(file).stat()
    return Document(path=path, file=file, size=st.length, mtime_ns=int(st.mtime * 1e9),
                    text_key=text_key)
  st = os.stat(file)
  return Document(path=path, file=file, size=st.st_size, mtime_ns=st.st_mtime_ns,
                  text_key=text_key)


def held_out(docs: list[Document], fraction: float) -> set[str]:
  """Paths of the validation documents: a stable hash of the path below `fraction`, at least one.

  Hashing the path (not the position in a listing) keeps a document on the same side of the split
  when files are added or removed elsewhere in the corpus.
  """
  return held_out_keys([d.path for d in docs], fraction)


def held_out_keys(keys: list[str], fraction: float) -> set[str]:
  """`held_out` on document names (prepare decides the split of records it has read)."""
  if len(keys) < 2:
    raise ValueError(
        f"The corpus has {len(keys)} document(s) but needs at least 2 (one is held out for "
        "validation); add files to data.files."
    )
  scores = {k: _unit_hash(k) for k in keys}
  chosen = {p for p, s in scores.items() if s < fraction}
  if not chosen:
    chosen = {min(scores, key=scores.get)}
  if len(chosen) == len(keys):
    raise ValueError(
        f"data.validation_fraction={fraction} holds out every document; use a value below 1."
    )
  return chosen


def fingerprint(docs: list[Document], *extra: object) -> str:
  """A short hash of the document list (names, sizes, mtimes) and `extra` settings."""
  h = hashlib.sha256(repr(extra).encode())
  for d in docs:
    h.update(f"{d.path}\0{d.size}\0{d.mtime_ns}\n".encode())
  return h.hexdigest()[:12]


def python_tag() -> str:
  return f"py{sys.version_info.major}{sys.version_info.minor}"


def _unit_hash(text: str) -> float:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64
