"""TensorRef: where one tensor's bytes live, and the dtype codes lazymerge knows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype code -> bytes per element (their torch dtypes: read/mapped.py, which
# alone needs torch: headers, plans and views do not).
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def itemsize(code: str) -> int:
    return ITEMSIZE[code]


@dataclass(frozen=True)
class Blocks:
    """How a GGUF tensor's bytes hold its values (read/gguf.py): llama.cpp's type
    (GGMLQuantizationType's value and name), whose blocks the reader decodes, and the head
    count of the Q/K row permutation llama.cpp's converter applied, which it undoes."""

    qtype: int
    type_name: str
    heads: int | None = None


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
    # A GGUF tensor stored in llama.cpp's blocks or row order: `dtype` is what it reads as
    # (F32 for a quantized type), `nbytes` what it takes in the file; None when plain.
    blocks: Blocks | None = None

    @property
    def contiguous(self) -> bool:
        """Plain row-major bytes of `dtype`: what a byte copy may take as it is."""
        return self.strides is None and self.blocks is None

    @property
    def copyable(self) -> bool:
        """Its values may be copied as they are: plain bytes, or a GGUF's rows decoded by
        the copy itself (run/tensor.py); a strided .bin view goes through a method."""
        return self.strides is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

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
