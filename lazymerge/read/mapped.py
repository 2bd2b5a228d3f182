"""Tensor values from read-only memory maps (read/maps.py): zero-copy views, pages
released after use, so resident memory does not grow with the size of the model."""

from __future__ import annotations

import mmap
import threading
import warnings

import torch

from lazymerge.read.maps import MappedFiles
from lazymerge.read.tensorref import TensorRef, itemsize

_QUIET = threading.Lock()
_quieted = False  # torch's one not-writable warning taken (see _quiet)
# safetensors dtype code -> torch dtype (their sizes: tensorref.ITEMSIZE; a test checks both agree).
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


class MappedReader(MappedFiles):
    """Zero-copy, read-only tensor views of checkpoint files' maps (MappedFiles)."""

    def __init__(self, files: MappedFiles | None = None) -> None:
        """New maps, or those of `files` (a merge's byte copies may start before torch)."""
        super().__init__(files)
        with self._lock:
            for m in list(self._maps.values())[:1]:
                _quiet(m)

    def _mapped(self, m: mmap.mmap) -> None:
        _quiet(m)

    def rows(self, ref: TensorRef, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows [row_start, row_stop) of a tensor as a zero-copy, read-only torch view.

        Never modify the result in place: the map is read-only. Copy it first.
        """
        shape = (row_stop - row_start, *ref.shape[1:]) if ref.shape else ()
        if ref.blocks is not None:  # a GGUF tensor: decoded, a copy (and not read-only)
            return self._decoded(ref, row_start, row_stop).view(shape)
        if ref.strides is not None:  # a strided .bin view: map its reach, then stride it
            whole = self._frombuffer(ref, ref.offset, (ref.span or 0) // itemsize(ref.dtype))
            return whole.as_strided(ref.shape, ref.strides)[row_start:row_stop]
        count = (row_stop - row_start) * (ref.row_nbytes // itemsize(ref.dtype))
        return self._frombuffer(ref, ref.offset + row_start * ref.row_nbytes, count).view(shape)

    def _decoded(self, ref: TensorRef, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows of a GGUF tensor in transformers' order: dequantized to float32, or its
        plain dtype's values, rows put back in place (read/gguf_model.py)."""
        import numpy as np

        from lazymerge.read.gguf_model import decode_rows

        raw = np.frombuffer(self._map(ref.file), np.uint8, count=ref.nbytes, offset=ref.offset)
        rows = decode_rows(raw.reshape(ref.rows, -1), ref, row_start, row_stop)
        if rows.dtype == np.uint8:  # a plain type's bytes, gathered
            return torch.from_numpy(np.ascontiguousarray(rows)).view(DTYPES[ref.dtype])
        return torch.from_numpy(rows)

    def _frombuffer(self, ref: TensorRef, offset: int, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=DTYPES[ref.dtype])
        m = self._map(ref.file)  # (torch's not-writable warning: taken by _quiet)
        return torch.frombuffer(m, dtype=DTYPES[ref.dtype], count=count, offset=offset)


def _quiet(m: mmap.mmap) -> None:
    """torch warns, once per process, that a read-only buffer is not writable: that is
    the point of ACCESS_READ. The first view is taken with that warning ignored, so no
    view after it needs catch_warnings — which swaps the process's filters, so would need
    a lock around every view, serialising the lanes."""
    global _quieted
    with _QUIET:
        if _quieted or len(m) == 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.frombuffer(m, dtype=torch.uint8, count=1)
        _quieted = True
