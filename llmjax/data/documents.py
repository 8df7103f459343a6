"""Finding the documents of a local corpus and deciding which ones are held out.

A document is one file (or one pydoc topic). Everything here is cheap (a directory walk and
`stat` calls, no reading) so the corpus can compute its cache key on every run.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sys
import sysconfig

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
  """One document: `path` is its stable name (also its TFDS key), `file` where to read it."""

  path: str
  file: str | None = None  # None: the text is a pydoc topic named by `path`.
  size: int = 0
  mtime_ns: int = 0

  def read(self) -> str:
    if self.file is None:
      import pydoc_data.topics  # pylint: disable=g-import-not-at-top

      return pydoc_data.topics.topics[self.path[len(PYDOC_PREFIX) :]]
    # errors="replace": one stray byte must not stop a build of thousands of files.
    with open(self.file, encoding="utf-8", errors="replace") as f:
      return f.read()


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


def file_documents(files: str) -> list[Document]:
  """Documents for `files`: one glob or several separated by commas (`**` recurses)."""
  patterns = [p.strip() for p in files.split(",") if p.strip()]
  if not patterns:
    raise ValueError("data.files is empty; set it to a glob of text files, e.g. 'corpus/**/*.txt'.")
  matched = set()
  for pattern in patterns:
    hits = [f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f)]
    if not hits:
      raise ValueError(
          f"The glob {pattern!r} in data.files matches no files; fix the pattern or the working "
          "directory (use an absolute path, and '**' to match subdirectories)."
      )
    matched.update(os.path.abspath(f) for f in hits)
  files_sorted = sorted(matched)
  # Names relative to the common directory keep the held-out choice stable when the corpus moves.
  root = os.path.commonpath([os.path.dirname(f) for f in files_sorted])
  return [_file_document(os.path.relpath(f, root).replace(os.sep, "/"), f) for f in files_sorted]


def _file_document(path: str, file: str) -> Document:
  st = os.stat(file)
  return Document(path=path, file=file, size=st.st_size, mtime_ns=st.st_mtime_ns)


def held_out(docs: list[Document], fraction: float) -> set[str]:
  """Paths of the validation documents: a stable hash of the path below `fraction`, at least one.

  Hashing the path (not the position in a listing) keeps a document on the same side of the split
  when files are added or removed elsewhere in the corpus.
  """
  if len(docs) < 2:
    raise ValueError(
        f"The corpus has {len(docs)} document(s) but needs at least 2 (one is held out for "
        "validation); add files to data.files."
    )
  scores = {d.path: _unit_hash(d.path) for d in docs}
  chosen = {p for p, s in scores.items() if s < fraction}
  if not chosen:
    chosen = {min(scores, key=scores.get)}
  if len(chosen) == len(docs):
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
