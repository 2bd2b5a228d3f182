"""Lazy tensor index: every tensor of a checkpoint as a reference, bytes served from mmaps.

Nothing here reads tensor data at open time: only the safetensors headers are parsed
(and checked against the file sizes). Data is read later through read-only memory maps
as zero-copy views, and its pages are released again once the engine has used them, so
resident memory does not grow with the size of the model.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lazymerge.errors import InputError

# safetensors dtype code -> torch dtype. Sizes come from torch itself.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A header is JSON describing tensors; 100 MB is far above any real model's (~1 MB for 13B)
# and keeps a corrupt length field from making us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000
PAGE = mmap.PAGESIZE


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, dtype code, shape, absolute byte offset."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Leading dimension, the unit of row-block processing (1 for scalars)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


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


class CheckpointIndex:
    """name -> TensorRef for a whole checkpoint (one file, or shards + index json)."""

    def __init__(self, path: Path, tensors: dict[str, TensorRef]) -> None:
        self.path = path
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointIndex:
        """Open a checkpoint directory or a single .safetensors file, headers only."""
        p = Path(path)
        if p.is_file():
            return cls(p, read_header(p))
        if not p.is_dir():
            raise InputError(f"{p}: no such checkpoint (not a file or directory)")
        if (p / SAFETENSORS_INDEX).is_file():
            return cls(p, _open_sharded(p, p / SAFETENSORS_INDEX))
        if (p / SINGLE_FILE).is_file():
            return cls(p, read_header(p / SINGLE_FILE))
        raise InputError(
            f"{p}: no {SINGLE_FILE} or {SAFETENSORS_INDEX} found "
            "(lazymerge reads Hugging Face safetensors checkpoints)"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(r.file for r in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())


def _open_sharded(directory: Path, index_path: Path) -> dict[str, TensorRef]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{index_path}: not a valid index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: weight_map is not a JSON object")
    # The weight map is the checkpoint, as for transformers: a tensor a shard holds but
    # the map does not list is not part of the model.
    headers = {
        shard: read_header(_shard_path(directory, index_path, shard))
        for shard in sorted(set(weight_map.values()), key=str)
    }
    tensors: dict[str, TensorRef] = {}
    for shard, header in headers.items():
        for name, ref in header.items():
            if weight_map.get(name) == shard:
                tensors[name] = ref
    for name, shard in weight_map.items():
        if name not in tensors:
            raise InputError(
                f"{index_path}: tensor {name!r} is listed in {shard} but that shard "
                "does not contain it"
            )
    return tensors


def _shard_path(directory: Path, index_path: Path, shard: object) -> Path:
    # An index is input from a stranger: it may only name files inside its own directory.
    if not isinstance(shard, str) or not shard or Path(shard).name != shard:
        raise InputError(
            f"{index_path}: shard name {shard!r} must be a file name inside {directory}"
        )
    path = directory / shard
    if not path.is_file():
        raise InputError(f"{index_path}: shard {shard} is missing from {directory}")
    return path


class MappedReader:
    """Read-only memory maps of checkpoint files, handing out zero-copy tensor views.

    The maps are opened lazily, one per file, and kept until `close()`; resident pages
    are dropped with `release()` after each use, so RSS stays bounded by what is in use.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._touched: set[Path] = set()

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            try:
                with open(path, "rb") as f:  # read-only: inputs are never modified
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise InputError(f"{path}: cannot read ({e.strerror})") from None
            self._maps[path] = m
        self._touched.add(path)
        return m

    def raw(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> memoryview:
        """Bytes [start, stop) of a tensor's data, as a view into the map."""
        stop = ref.nbytes if stop is None else stop
        return memoryview(self._map(ref.file))[ref.offset + start : ref.offset + stop]

    def rows(self, ref: TensorRef, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows [row_start, row_stop) of a tensor as a zero-copy, read-only torch view.

        Never modify the result in place: the map is read-only. Copy it first.
        """
        shape = (row_stop - row_start, *ref.shape[1:]) if ref.shape else ()
        count = (row_stop - row_start) * (ref.row_nbytes // itemsize(ref.dtype))
        if count == 0:
            return torch.empty(shape, dtype=DTYPES[ref.dtype])
        with warnings.catch_warnings():
            # torch warns that the buffer is not writable; that is the point of ACCESS_READ.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map(ref.file),
                dtype=DTYPES[ref.dtype],
                count=count,
                offset=ref.offset + row_start * ref.row_nbytes,
            )
        return flat.view(shape)

    def release(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> None:
        """Drop the resident pages of bytes [start, stop) of a tensor (data stays on disk)."""
        stop = ref.nbytes if stop is None else stop
        m = self._maps.get(ref.file)
        if m is None or stop <= start:
            return
        lo = (ref.offset + start) // PAGE * PAGE
        hi = min(len(m), -(-(ref.offset + stop) // PAGE) * PAGE)
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_touched(self) -> None:
        """Drop every resident page of the files read since the last call.

        Releasing exactly what was read is not enough: the kernel maps neighbouring
        pages around each fault ("fault-around"), which may belong to tensors this merge
        never reads, and those would accumulate over a model.
        """
        for path in self._touched:
            m = self._maps[path]
            m.madvise(mmap.MADV_DONTNEED, 0, len(m))
        self._touched.clear()

    def close(self) -> None:
        for m in self._maps.values():
            # A view still alive somewhere keeps its map; it goes when the view does.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()

    def __enter__(self) -> MappedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
