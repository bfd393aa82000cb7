"""The safetensors file format in numpy (writer and reader), so the device needs no extra package.

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian tensor
bytes. Files written here load with `safetensors.numpy/torch.load_file` (a test checks).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def dumps(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise SafetensorsError(f"{name}: dtype {a.dtype} not supported")
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # 8-byte alignment of the data, as the reference writer pads
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def loads(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if len(data) < 8:
        raise SafetensorsError("not a safetensors file: shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError("not a safetensors file: bad header length")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"not a safetensors file: header is not JSON ({e})") from e
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n :]
    out = {}
    for name, d in header.items():
        try:
            dt = np.dtype(_DTYPES[d["dtype"]]).newbyteorder("<")
            b0, b1 = d["data_offsets"]
            shape = tuple(int(s) for s in d["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{name}: bad tensor entry {d!r}") from e
        if not 0 <= b0 <= b1 <= len(body) or (b1 - b0) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise SafetensorsError(f"{name}: data offsets {b0}..{b1} do not match shape {shape}")
        out[name] = np.frombuffer(body[b0:b1], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
    return out, dict(meta)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    with open(path, "wb") as f:
        f.write(dumps(tensors, metadata))


def load_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with open(path, "rb") as f:
        return loads(f.read())
