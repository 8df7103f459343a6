"""A stand-in for Google Cloud Storage on this machine, for tests of gs:// workdirs.

Both clients llmjax reaches GCS through are pointed at one local folder, ROOT/<bucket>/<object>:
  * TensorStore (Orbax's array writer) keeps its real `gcs` driver and talks HTTP to `serve`, a
    small server for the part of the GCS JSON API that driver uses (read with ranges and
    generation conditions, media upload with ifGenerationMatch, list, delete);
  * etils epath keeps its real gs:// branch (the fsspec backend) and gets `LocalBucketFS`, an
    fsspec filesystem registered for the gs/gcs protocols in place of gcsfs.
  * Orbax's one question to google-cloud-storage (does the bucket have a hierarchical namespace?)
    is answered "no", as for a default bucket.
What is not exercised: gcsfs and google-cloud-storage themselves, GCS authentication, and GCS's
lack of real directories (the folder behind the stand-in has them).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import types
import urllib.parse
from unittest import mock
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
from fsspec.registry import _registry
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class _Objects:
    """Objects as files under root/<bucket>/, each with a generation that grows on every write."""

    def __init__(self, root: str):
        self.root, self._lock, self._seen, self._counter = root, threading.Lock(), {}, 0

    def file(self, bucket: str, name: str) -> str:
        return os.path.join(self.root, bucket, name)

    def generation(self, path: str) -> int:
        """0 for a missing object; a new number whenever the file changed since last seen."""
        if not os.path.isfile(path):
            return 0
        st = os.stat(path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if self._seen.get(path, (None,))[0] != key:
                self._counter += 1
                self._seen[path] = (key, self._counter)
            return self._seen[path][1]

    def write(self, path: str, data: bytes) -> int:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.fake-gcs-upload-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a new inode: a new generation
        return self.generation(path)

    def names(self, bucket: str) -> list[str]:
        top = os.path.join(self.root, bucket)
        found = []
        for dirpath, _, files in os.walk(top):
            found += [os.path.relpath(os.path.join(dirpath, f), top).replace(os.sep, "/")
                      for f in files if ".fake-gcs-upload-" not in f]
        return sorted(found)


def _handler(objects: _Objects):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, body: bytes = b"", headers: dict | None = None):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _parse(self):
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            parts = url.path.split("/")  # '', [upload,] storage, v1, b, BUCKET, o[, OBJECT]
            if parts[1] == "upload":
                parts = parts[1:]
            bucket = parts[4]
            name = urllib.parse.unquote(parts[6]) if len(parts) > 6 else query.get("name")
            return bucket, name, query

        def _condition_fails(self, generation: int, query: dict) -> bool:
            match, not_match = query.get("ifGenerationMatch"), query.get("ifGenerationNotMatch")
            return ((match is not None and int(match) != generation)
                    or (not_match is not None and int(not_match) == generation))

        def _meta(self, bucket, name, path, generation) -> bytes:
            return json.dumps({"bucket": bucket, "name": name, "size": str(os.path.getsize(path)),
                               "generation": str(generation)}).encode()

        def do_GET(self):
            bucket, name, query = self._parse()
            if name is None:  # list
                lo, hi = query.get("startOffset", ""), query.get("endOffset")
                prefix = query.get("prefix", "")
                items = [{"name": n, "size": str(os.path.getsize(objects.file(bucket, n))),
                          "generation": str(objects.generation(objects.file(bucket, n)))}
                         for n in objects.names(bucket)
                         if n >= lo and (hi is None or n < hi) and n.startswith(prefix)]
                return self._reply(200, json.dumps({"items": items}).encode())
            path = objects.file(bucket, name)
            generation = objects.generation(path)
            if not generation:
                return self._reply(404, b'{"error": "not found"}')
            if self._condition_fails(generation, query):
                code = 304 if "ifGenerationNotMatch" in query else 412
                return self._reply(code, headers={"x-goog-generation": str(generation)})
            if query.get("alt") != "media":
                return self._reply(200, self._meta(bucket, name, path, generation))
            with open(path, "rb") as f:
                data = f.read()
            headers = {"x-goog-generation": str(generation)}
            ranged = self.headers.get("Range")
            if ranged:
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                if first:
                    start, stop = int(first), int(last) + 1 if last else len(data)
                else:  # the last N bytes
                    start, stop = max(len(data) - int(last), 0), len(data)
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                return self._reply(206, data[start:stop], headers)
            return self._reply(200, data, headers)

        def do_POST(self):
            bucket, name, query = self._parse()
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = objects.file(bucket, name)
            if self._condition_fails(objects.generation(path), query):
                return self._reply(412, b'{"error": "precondition failed"}')
            generation = objects.write(path, data)
            self._reply(200, self._meta(bucket, name, path, generation))

        def do_DELETE(self):
            bucket, name, query = self._parse()
            path = objects.file(bucket, name)
            generation = objects.generation(path)
            if not generation:
                return self._reply(404, b'{"error": "not found"}')
            if self._condition_fails(generation, query):
                return self._reply(412, b'{"error": "precondition failed"}')
            os.remove(path)
            self._reply(204)

    return Handler


class LocalBucketFS(DirFileSystem):
    """fsspec's view of gs://BUCKET/PATH as ROOT/BUCKET/PATH (in place of gcsfs)."""

    protocol = ("gs", "gcs")
    cachable = False
    root = ""

    def __init__(self, **kwargs):  # epath passes gcsfs options (finalize_on_close): none apply
        # auto_mkdir: like an object store, a write needs no parent folder.
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))


@contextlib.contextmanager
def serve(root: str):
    """Points TensorStore's gcs driver and epath's gs:// backend at `root` while active."""
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(_Objects(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{server.server_port}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_fs = {p: _registry.get(p) for p in LocalBucketFS.protocol}
    os.environ.update(env)
    LocalBucketFS.root = root
    for protocol in LocalBucketFS.protocol:
        fsspec.register_implementation(protocol, LocalBucketFS, clobber=True)
    type(backend.fsspec_backend)._get_filesystem.cache_clear()
    # Orbax asks google-cloud-storage whether the bucket has a hierarchical namespace: a plain
    # bucket does not.
    plain_bucket = types.SimpleNamespace(hierarchical_namespace_enabled=False)
    flat = mock.patch.object(gcs_utils, "get_bucket", lambda name: plain_bucket)
    try:
        with flat:
            yield
    finally:
        server.shutdown()
        server.server_close()
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        for protocol, cls in saved_fs.items():
            if cls is None:
                _registry.pop(protocol, None)
            else:
                fsspec.register_implementation(protocol, cls, clobber=True)
        type(backend.fsspec_backend)._get_filesystem.cache_clear()
