"""The safetensors file format, read and written with numpy alone.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Reading it can never run code (unlike PyTorch's
pickled `.bin` files), and parsing it here needs neither torch nor the `safetensors` package.
Tensors are memory-mapped, so a large checkpoint is read one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit: a larger header is a corrupt or hostile file


class File:
    """Lazy view of one .safetensors file: `names()`, `dtype(name)`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than its header); "
                                 "re-download or re-save it.")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise ValueError(f"{self.path} has a {size}-byte header, more than safetensors allows; "
                                 "the file is corrupt, re-download or re-save it.")
            header = json.loads(f.read(size))
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._offset = 8 + size
        self._map = None

    def names(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the file (no copy)."""
        entry = self._entries[name]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name!r} in {self.path} has dtype {entry['dtype']}, which "
                             "numpy cannot hold; convert the checkpoint to float32, bfloat16 or "
                             "float16 first.")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
        if end - begin != nbytes or self._offset + end > self._map.size:
            raise ValueError(f"tensor {name!r} in {self.path} has byte range {begin}..{end}, which "
                             f"does not fit its shape {entry['shape']} or the file; the file is "
                             "truncated or corrupt, re-download or re-save it.")
        data = self._map[self._offset + begin:self._offset + end]
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Writes `tensors` (name -> numpy array) as one safetensors file, atomically."""
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store; "
                             "cast it to float32 first.")
        arrays[name] = a
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensors start 8-byte aligned, as the format recommends
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
    os.replace(tmp, path)
