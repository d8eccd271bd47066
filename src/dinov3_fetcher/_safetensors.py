"""Read and check a safetensors header without reading the tensor data (or trusting its claims).

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON, then the data. The tensors'
``data_offsets`` must tile the data area exactly: no gap, no overlap, and 8 + N + the last end == file size.
That finds a truncated or padded file by reading a few kilobytes instead of gigabytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_HEADER_BYTES", "SafetensorsError", "TensorInfo", "read_header"]

# safetensors itself refuses headers over 100 MB; a 7B checkpoint's header is ~100 KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class SafetensorsError(ValueError):
    """The file is not a well-formed, complete safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: dtype, shape and its byte range in the data."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check ``path``'s header; return its tensors. Raises SafetensorsError with the reason."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{path.name} is truncated ({size} bytes, not even a header length)")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path.name} claims a {n}-byte header, over the {MAX_HEADER_BYTES} byte limit")
        if 8 + n > size:
            raise SafetensorsError(f"{path.name} is truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError(f"{path.name} has a header that is not JSON") from None
    except RecursionError:
        raise SafetensorsError(f"{path.name} has a header that is nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name} has a header that is not a JSON object")
    tensors = {name: _tensor(path.name, name, spec) for name, spec in header.items() if name != "__metadata__"}
    expected = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != expected:
            what = "overlaps another tensor" if t.begin < expected else "leaves a gap before it"
            raise SafetensorsError(f"{path.name}: tensor {name} {what} (offset {t.begin}, expected {expected})")
        expected = t.end
    if 8 + n + expected != size:
        state = "truncated" if 8 + n + expected > size else "longer than its header says"
        raise SafetensorsError(
            f"{path.name} is {state}: header accounts for {8 + n + expected} bytes, the file has {size}"
        )
    return tensors


def _tensor(filename: str, name: str, spec: object) -> TensorInfo:
    if not isinstance(spec, dict):
        raise SafetensorsError(f"{filename}: entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise SafetensorsError(f"{filename}: tensor {name} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise SafetensorsError(f"{filename}: tensor {name} has a malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{filename}: tensor {name} has malformed data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(
            f"{filename}: tensor {name} spans {offsets[1] - offsets[0]} bytes, its shape needs {nbytes}"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
