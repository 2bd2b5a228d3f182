"""Lazy tensor index: every tensor of a checkpoint as a reference, bytes served from mmaps.

Nothing here reads tensor data at open time: only the safetensors headers (or a `.bin`'s
pickled tensor records, see torchzip.py) are parsed and checked against the file sizes. Data is read later through read-only memory maps
as zero-copy views, and its pages are released again once the engine has used them, so
resident memory does not grow with the size of the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lazymerge.errors import InputError
from lazymerge.tensorref import DTYPES, FLOAT_CODES, TensorRef, itemsize
from lazymerge.torchzip import is_torch_zip, metadata_digest, read_bin

__all__ = ["DTYPES", "FLOAT_CODES", "CheckpointIndex", "MappedReader", "TensorRef", "itemsize"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
# A header is JSON describing tensors; 100 MB is far above any real model's (~1 MB for 13B)
# and keeps a corrupt length field from making us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000
PAGE = mmap.PAGESIZE


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


def read_tensor_file(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one weights file: safetensors, or a torch.save zip (.bin)."""
    if path.suffix in (".bin", ".pt", ".pth") or is_torch_zip(path):
        return read_bin(path)
    return read_header(path)


def header_digest(path: Path) -> str:
    """sha256 of a weights file's metadata (safetensors header or .bin data.pkl)."""
    if path.suffix in (".bin", ".pt", ".pth") or is_torch_zip(path):
        return metadata_digest(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(n)).hexdigest()


class CheckpointIndex:
    """name -> TensorRef for a whole checkpoint (one file, or shards + index json)."""

    def __init__(self, path: Path, tensors: dict[str, TensorRef], fmt: str, note: str = "") -> None:
        self.path = path
        self.tensors = tensors
        self.format = fmt  # "safetensors" or "bin"
        self.note = note  # e.g. which format was chosen when both are present

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointIndex:
        """Open a checkpoint directory or a single weights file, metadata only.

        A directory with both safetensors and `.bin` weights is read as safetensors.
        """
        p = Path(path)
        if p.is_file():
            refs = read_tensor_file(p)
            return cls(
                p, refs, "bin" if p.suffix != ".safetensors" and is_torch_zip(p) else "safetensors"
            )
        if not p.is_dir():
            raise InputError(f"{p}: no such checkpoint (not a file or directory)")
        safetensors = _open_dir(p, SAFETENSORS_INDEX, SINGLE_FILE)
        has_bin = (p / BIN_INDEX).is_file() or (p / BIN_FILE).is_file()
        if safetensors is not None:
            note = "safetensors (its .bin weights are ignored)" if has_bin else ""
            return cls(p, safetensors, "safetensors", note)
        if has_bin:
            bins = _open_dir(p, BIN_INDEX, BIN_FILE)
            assert bins is not None  # has_bin says one of the two files is there
            return cls(p, bins, "bin")
        raise InputError(
            f"{p}: no {SINGLE_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX} found; "
            "is this a Hugging Face checkpoint directory?"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(r.file for r in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())


def _open_dir(directory: Path, index_name: str, single: str) -> dict[str, TensorRef] | None:
    if (directory / index_name).is_file():
        return _open_sharded(directory, directory / index_name)
    if (directory / single).is_file():
        return read_tensor_file(directory / single)
    return None


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
        shard: read_tensor_file(_shard_path(directory, index_path, shard))
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
        self._fds: dict[Path, int] = {}
        self._touched: set[Path] = set()

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            m = self._maps[path] = mmap.mmap(self.fd(path), 0, access=mmap.ACCESS_READ)
        self._touched.add(path)
        return m

    def fd(self, path: Path) -> int:
        """The file's descriptor, opened read-only (inputs are never modified)."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise InputError(f"{path}: cannot read ({e.strerror})") from None
        return fd

    def raw(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> memoryview:
        """Bytes [start, stop) of a tensor's data, as a view into the map."""
        stop = ref.nbytes if stop is None else stop
        return memoryview(self._map(ref.file))[ref.offset + start : ref.offset + stop]

    def rows(self, ref: TensorRef, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows [row_start, row_stop) of a tensor as a zero-copy, read-only torch view.

        Never modify the result in place: the map is read-only. Copy it first.
        """
        shape = (row_stop - row_start, *ref.shape[1:]) if ref.shape else ()
        if ref.strides is not None:  # a strided .bin view: map its reach, then stride it
            whole = self._frombuffer(ref, ref.offset, (ref.span or 0) // itemsize(ref.dtype))
            return whole.as_strided(ref.shape, ref.strides)[row_start:row_stop]
        count = (row_stop - row_start) * (ref.row_nbytes // itemsize(ref.dtype))
        return self._frombuffer(ref, ref.offset + row_start * ref.row_nbytes, count).view(shape)

    def _frombuffer(self, ref: TensorRef, offset: int, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=DTYPES[ref.dtype])
        with warnings.catch_warnings():
            # torch warns that the buffer is not writable; that is the point of ACCESS_READ.
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(
                self._map(ref.file), dtype=DTYPES[ref.dtype], count=count, offset=offset
            )

    def release(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> None:
        """Drop the resident pages of bytes [start, stop) of a tensor (data stays on disk)."""
        stop = ref.nbytes if stop is None else stop
        m = self._maps.get(ref.file)
        if m is None or stop <= start or ref.strides is not None:
            return  # strided views go with release_touched, after their tensor
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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> MappedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
