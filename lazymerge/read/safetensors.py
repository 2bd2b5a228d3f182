"""safetensors headers, parsed and checked by hand: each tensor's dtype, shape and exact
byte range, validated against the file's size before any data is read.

What is refused is what huggingface/safetensors' own `validate` refuses (its Rust
`Metadata::validate` and `read_metadata`), with a message naming the tensor and the fix,
plus what it reads silently but other tools may read otherwise: a key given twice in the
header JSON (safetensors keeps the last entry of a duplicated tensor name; a reader that
keeps the first gets other weights).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError
from lazymerge.read.tensorref import ITEMSIZE, TensorRef, itemsize

# A header is JSON describing tensors; 100 MB is far above any real model's (~1 MB for 13B)
# and keeps a corrupt length field from making us allocate gigabytes. (safetensors' limit.)
MAX_HEADER_BYTES = 100_000_000
RESAVE = "re-save it with safetensors.torch.save_file"
_USIZE = 2**64  # safetensors reads sizes and offsets as Rust usize


class JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once (`repeated`:
    key -> every value, in file order); json.loads alone silently keeps the last."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.repeated: dict[str, list[Any]] = {}
        if len(self) < len(pairs):
            for key, value in pairs:
                self.repeated.setdefault(key, []).append(value)
            self.repeated = {k: vs for k, vs in self.repeated.items() if len(vs) > 1}
        for key, value in pairs:
            for text in (key, value):
                if isinstance(text, str) and not text.isascii():
                    text.encode("utf-8")  # a lone surrogate (\ud800) raises ValueError


def _json_int(text: str) -> int | float:
    # serde_json (safetensors) reads -0 and integers past u64 as floats, which are no
    # size: keep them floats, so they are refused here as there. (float(text), not
    # float(n): a 400-digit n overflows a float.)
    n = int(text)
    return float(text) if text == "-0" or n >= _USIZE else n


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def load_json(text: str) -> Any:
    """json.loads, refusing what serde_json (safetensors' parser) refuses and Python's
    json accepts: NaN and Infinity, lone surrogates. Objects come back as `JsonObject`s.

    Raises ValueError (JSONDecodeError, a lone surrogate, NaN, a 5000-digit number) or
    RecursionError (nesting); the caller names the file.
    """
    return json.loads(
        text, object_pairs_hook=JsonObject, parse_int=_json_int, parse_constant=_no_constant
    )


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
        header = load_json(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError too
        raise InputError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, JsonObject):
        raise InputError(f"{path}: header is not a JSON object")
    _check_unique(path, header)
    _check_metadata(path, header.get("__metadata__"))
    data_start = 8 + header_len
    refs = [
        _parse_entry(path, name, entry, data_start)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    # As safetensors sorts: by (start, end), so a zero-size tensor sorts before a tensor
    # starting at the same offset whatever the header's order.
    refs.sort(key=lambda r: (r.offset, r.nbytes))
    _check_layout(path, refs, data_start, size)
    return {r.name: r for r in refs}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _check_unique(path: Path, header: JsonObject) -> None:
    """No key twice: safetensors keeps a duplicated tensor's last entry (and reads a file
    with the same entry twice without a word), another reader may keep the first."""
    if header.repeated:
        name, entries = next(iter(header.repeated.items()))
        raise InputError(
            f"{path}: {_what(name)} appears {len(entries)} times in the header, "
            f"so readers may disagree on which entry counts; {RESAVE}"
        )
    for name, entry in header.items():
        if isinstance(entry, JsonObject) and entry.repeated:
            key, values = next(iter(entry.repeated.items()))
            raise InputError(
                f"{path}: {_what(name)} has key {key!r} {len(values)} times in the header; {RESAVE}"
            )


def _what(name: str) -> str:
    return "'__metadata__'" if name == "__metadata__" else f"tensor {name!r}"


def _check_metadata(path: Path, metadata: object) -> None:
    # safetensors refuses anything but null or an object of strings here.
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError(
            f"{path}: '__metadata__' must map names to strings, not {metadata!r:.60}; {RESAVE}"
        )


def _size(value: object) -> bool:
    # bool is an int in Python, not in JSON; serde reads neither true nor 1.0 as a size.
    return type(value) is int and 0 <= value < _USIZE


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorRef:
    if not isinstance(entry, dict):
        raise InputError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise InputError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_size(d) for d in shape)):
        raise InputError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_size(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise InputError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
        if numel * itemsize(dtype) * 8 >= _USIZE:  # safetensors' checked_mul, in bits
            raise InputError(f"{path}: tensor {name!r} has a shape too large {shape!r}")
    nbytes = offsets[1] - offsets[0]
    if nbytes != numel * itemsize(dtype):
        raise InputError(
            f"{path}: tensor {name!r} spans {nbytes} bytes but {dtype} {shape} needs "
            f"{numel * itemsize(dtype)}"
        )
    return TensorRef(name, path, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _check_layout(path: Path, refs: list[TensorRef], data_start: int, size: int) -> None:
    """The tensors, sorted, tile the data section: the first starts at its byte 0, each
    next one where the one before ends, the last ends with the file (safetensors refuses
    any gap, overlap or trailing byte). Zero-size tensors sit between two others, or
    several at one offset."""
    end = max((r.offset + r.nbytes for r in refs), default=data_start)
    if end > size:
        raise InputError(
            f"{path}: tensor data ends at byte {end} but the file has {size}; the file is truncated"
        )
    at, before = data_start, ""
    for r in refs:
        if r.offset < at:
            raise InputError(
                f"{path}: tensor {r.name!r} overlaps the tensor before it ({before!r}, "
                f"which ends at data offset {at - data_start}); {RESAVE}"
            )
        if r.offset > at:
            raise InputError(
                f"{path}: data offsets {at - data_start} to {r.offset - data_start}, before "
                f"tensor {r.name!r}, belong to no tensor (safetensors refuses gaps); {RESAVE}"
            )
        at, before = r.offset + r.nbytes, r.name
    if at < size:
        raise InputError(
            f"{path}: the last {size - at} bytes of the file belong to no tensor "
            f"(safetensors refuses trailing bytes); {RESAVE}"
        )
