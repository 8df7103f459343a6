"""Workdir paths: a local folder or a gs:// bucket, through one type (etils `epath.Path`).

Every file llmjax reads or writes in a workdir (checkpoints, metrics.jsonl, TensorBoard events,
tokenizer.model, data_spec.json, converted configs) goes through `path`. A local path is made
absolute (Orbax needs that); a URL such as gs://bucket/run is kept, and epath sends it to its GCS
backend (fsspec's gcsfs, or tf.io.gfile where TensorFlow is installed), while Orbax writes the
arrays with TensorStore's own gcs driver. An object store cannot append to a file, so files that
grow (metrics.jsonl, event files) are written with `open_append`.
"""

from __future__ import annotations

import os
import time

from etils import epath

# How often a growing remote file is uploaded again (each upload rewrites the whole object);
# closing it always uploads. A killed run loses at most this many seconds of metrics.
UPLOAD_EVERY_S = 30.0


def is_remote(p) -> bool:
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    """`p` as an epath.Path: absolute if local, unchanged if a URL."""
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def check_reachable(p: str, name: str) -> None:
    """Raises ValueError (one sentence naming `name`) for a URL llmjax cannot read or write."""
    if not is_remote(p):
        return
    if not p.startswith("gs://"):
        raise ValueError(f"{name}={p}: the only remote paths supported are gs://bucket/path "
                         "(Google Cloud Storage); or give a local path.")
    import fsspec
    try:
        fsspec.get_filesystem_class("gs")
    except ImportError as e:  # gcsfs also brings google-cloud-storage, which Orbax asks too
        raise ValueError(f"{name}={p} needs gcsfs, through which epath and Orbax reach gs://: "
                         "pip install gcsfs.") from e


def check_workdir(workdir: str) -> None:
    """Raises ValueError (one sentence) for a workdir llmjax cannot use; reads, never writes."""
    check_reachable(workdir, "--workdir")
    p = path(workdir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--workdir={workdir} is a file, not a directory; give a directory "
                         "(it is created if missing).")


class RewrittenFile:
    """A growing file on an object store: keeps every byte written and uploads the whole object
    on `flush` (at most every UPLOAD_EVERY_S seconds) and on `close`. With `append`, it starts
    from the object's current contents, so a resumed run continues the same file."""

    def __init__(self, p, *, append: bool = False):
        self.path = path(p)
        self._data = bytearray(self.path.read_bytes() if append and self.path.exists() else b"")
        self._uploaded = len(self._data)
        self._last_upload = time.monotonic()

    def write(self, data) -> int:
        self._data += data.encode("utf-8") if isinstance(data, str) else data
        return len(data)

    def flush(self, *, force: bool = False) -> None:
        due = force or time.monotonic() - self._last_upload >= UPLOAD_EVERY_S
        if due and len(self._data) != self._uploaded:
            self.path.write_bytes(bytes(self._data))
            self._uploaded, self._last_upload = len(self._data), time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


def open_append(p):
    """A text file to append to and flush: a local file (each flush reaches the disk), or a
    `RewrittenFile` for a URL."""
    if is_remote(p):
        return RewrittenFile(p, append=True)
    return open(path(p), "a", encoding="utf-8")
