"""Exact sums of a whole tensor, streamed in blocks of whole rows.

mergekit sums a task vector's magnitudes (the L1 rescale) or squares (SCE's weights) over
the whole tensor with one torch reduction; lazymerge sees the tensor a block at a time
and must get a result that does not depend on the blocks. Each row is summed in float64
in segments of 8192 columns (torch splits a longer lone row across threads, so a segment
is what one thread sums), and the segment sums are accumulated *exactly* (Shewchuk's
partials, as `math.fsum` keeps them internally), so the total is the correctly rounded
sum of every segment sum, whatever the blocks. The partials are a handful of Python
floats: nothing per block is kept (thousands of small tensors kept per tensor pinned
freed block buffers in the heap and grew RSS by gigabytes on a 13B embedding). Being exact,
sums of any shares of the rows merge into the same total: lanes each keep their own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SEGMENT = 8192  # columns summed as one float64 partial per row


def wide(d: torch.dtype) -> torch.dtype:
    """The dtype torch accumulates `d` in on the CPU, and the one mergekit's slerp and
    karcher work in: float64 for float64, else float32."""
    import torch

    return torch.float64 if d == torch.float64 else torch.float32


def f64(x: torch.Tensor) -> torch.Tensor:
    """`x` as float64, exactly: 16-bit floats through float32, whose conversions torch
    vectorises (half to double directly runs element by element: twice the time)."""
    return (x.float() if x.element_size() < 4 else x).double()


class Sum:
    """A whole tensor's sum, the same for any split of it into blocks of rows."""

    def __init__(self) -> None:
        self.partials: list[float] = []  # non-overlapping, increasing magnitude

    def add(self, x: torch.Tensor) -> None:
        rows = f64(x).reshape(len(x), -1)
        for c in range(0, rows.shape[1], SEGMENT):
            for value in rows[:, c : c + SEGMENT].sum(1).tolist():
                self._grow(value)

    def _grow(self, x: float) -> None:
        """Add `x` to the partials exactly (two-sum on each, the rounding errors kept)."""
        kept = 0
        for y in self.partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                self.partials[kept] = lo
                kept += 1
            x = hi
        del self.partials[kept:]
        self.partials.append(x)

    def part(self) -> Sum:
        """An empty Sum for a share of the same tensor's blocks (`merge`)."""
        return Sum()

    def merge(self, part: Sum) -> None:
        """Adds a part's sum exactly: the total is the same whatever rows each part
        summed, and in whatever order the parts come back."""
        for value in part.partials:
            self._grow(value)

    def total(self) -> float:
        """The exact sum, rounded once to float64."""
        return math.fsum(self.partials)

    def rounded(self, dtype: torch.dtype) -> torch.Tensor:
        """As a 0-dim tensor: the float64 total, rounded to `dtype` through float32 (as
        mergekit's fp32-accumulated torch sum is rounded), float64 kept for float64."""
        import torch

        exact = torch.tensor(self.total(), dtype=torch.float64)
        return exact if dtype == torch.float64 else exact.float().to(dtype)
