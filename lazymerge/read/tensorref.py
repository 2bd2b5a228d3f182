"""TensorRef: where one tensor's bytes live, and the dtype codes lazymerge knows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

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


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, dtype code, shape, absolute byte offset."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of element 0
    nbytes: int  # numel * itemsize
    # Element strides when the bytes are not plain row-major (a .bin view); None when they are.
    strides: tuple[int, ...] | None = None
    span: int | None = None  # bytes reachable from `offset` when strided

    @property
    def contiguous(self) -> bool:
        return self.strides is None

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
