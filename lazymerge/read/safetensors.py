"""safetensors headers, parsed and checked by hand: each tensor's dtype, shape and exact
byte range, validated against the file's size before any data is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lazymerge.errors import InputError
from lazymerge.read.tensorref import DTYPES, TensorRef, itemsize

# A header is JSON describing tensors; 100 MB is far above any real model's (~1 MB for 13B)
# and keeps a corrupt length field from making us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one safetensors file's header; return its tensors in file order."""
    size = _file_size(path)
    if size < 8:
        raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise InputError(
                    f"{path}: header length {header_len} is larger than the file "
                    f"({size} bytes); the file is truncated or not safetensors"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    refs = [
        _parse_entry(path, name, entry, data_start)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    refs.sort(key=lambda r: r.offset)
    _check_layout(path, refs, data_start, size)
    return {r.name: r for r in refs}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorRef:
    if not isinstance(entry, dict):
        raise InputError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise InputError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InputError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise InputError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = offsets[1] - offsets[0]
    if nbytes != numel * itemsize(dtype):
        raise InputError(
            f"{path}: tensor {name!r} spans {nbytes} bytes but {dtype} {shape} needs "
            f"{numel * itemsize(dtype)}"
        )
    return TensorRef(name, path, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _check_layout(path: Path, refs: list[TensorRef], data_start: int, size: int) -> None:
    end = data_start
    for r in refs:
        if r.offset < end:
            raise InputError(f"{path}: tensor {r.name!r} overlaps the tensor before it")
        end = r.offset + r.nbytes
    if end > size:
        raise InputError(
            f"{path}: tensor data ends at byte {end} but the file has {size}; the file is truncated"
        )
