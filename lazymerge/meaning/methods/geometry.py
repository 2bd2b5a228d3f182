"""What the geometric methods (slerp, nuslerp, multislerp, karcher, model_stock,
arcee_fusion) share: sums over a whole tensor, its columns or its rows, streamed in blocks
of rows, and rounded as torch's reductions round; the accumulator of a statistics pass.

mergekit computes a norm or a dot product with one torch reduction over the whole tensor:
in float32 for float16/bfloat16 values (then rounded to them), in the values' own dtype
otherwise, in an order that depends on the CPU's vector width and threads. lazymerge sums
the same terms in float64, in an order that depends only on the tensor (segments of 8192
columns, as exact.Sum; columns folded row by row), and rounds that to float32 and then to
the compute dtype: the correctly rounded value mergekit's approximates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lazymerge.meaning.methods.exact import SEGMENT, Sum, f64, wide
from lazymerge.meaning.methods.task import dtype_of

if TYPE_CHECKING:
    import torch

    from lazymerge.meaning.methods.base import Block

__all__ = [
    "ColumnSum", "Pass", "Sum", "VectorSums", "dtype_of", "last_sums", "rounded", "vectors", "wide",
]  # fmt: skip

WHOLE, ROWS, COLUMNS = "whole", "rows", "columns"  # what one vector of a tensor is


def rounded(exact: float | torch.Tensor, d: torch.dtype) -> torch.Tensor:
    """A float64 sum as torch's reduction in `d` gives it: rounded to float32 (unless `d`
    is float64), then to `d`; a tensor keeps its shape, a float becomes 0-dim."""
    import torch

    value = torch.as_tensor(exact, dtype=torch.float64)
    return value.to(d) if d == torch.float64 else value.float().to(d)


def last_sums(x: torch.Tensor) -> torch.Tensor:
    """Float64 sums over the last dimension (keepdim), each the same for any block of rows."""
    flat = f64(x).reshape(-1, x.shape[-1])
    total = flat[:, :SEGMENT].sum(1)
    for c in range(SEGMENT, flat.shape[1], SEGMENT):
        total += flat[:, c : c + SEGMENT].sum(1)
    return total.reshape(*x.shape[:-1], 1)


class ColumnSum:
    """Float64 sums over the rows (dimension 0) of a tensor streamed in blocks: each column
    folded row by row, in order, so the result does not depend on the blocks."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        rows = f64(x)
        if self.total is None:
            self.total = rows[0].clone()
            rows = rows[1:]
        for row in rows:
            self.total += row

    def result(self) -> torch.Tensor:
        """The sums, shaped as one row with a leading axis of 1 (broadcasts over rows)."""
        assert self.total is not None, "ColumnSum: no rows"
        return self.total.unsqueeze(0)


class VectorSums:
    """Float64 sums of an elementwise quantity over each vector of a tensor streamed in
    blocks: the whole tensor (a 0-dim result) or its columns (one row of results). The
    whole tensor's sum is exact, and merges (`part`, `merge`); the columns' are folded in
    row order, and do not."""

    def __init__(self, mode: str) -> None:
        assert mode in (WHOLE, COLUMNS), mode
        self.mode = mode
        self.parts: Sum | ColumnSum = Sum() if mode == WHOLE else ColumnSum()

    def add(self, x: torch.Tensor) -> None:
        self.parts.add(x)

    def part(self) -> VectorSums:
        assert self.mode == WHOLE, "columns are folded in row order: no parts"
        return VectorSums(WHOLE)

    def merge(self, part: VectorSums) -> None:
        assert isinstance(self.parts, Sum) and isinstance(part.parts, Sum)
        self.parts.merge(part.parts)

    def exact(self) -> torch.Tensor:
        import torch

        if isinstance(self.parts, Sum):
            return self.parts.rounded(torch.float64)
        return self.parts.result()


def vectors(shape: tuple[int, ...], flatten: bool, along_rows: bool) -> str:
    """What one vector of a tensor of `shape` is: the whole tensor (flattened, or 1-D), each
    row's last dimension, or each column (mergekit's `transpose(0, -1)`)."""
    if flatten or len(shape) < 2:
        return WHOLE
    return COLUMNS if along_rows else ROWS


@dataclass
class Pass:
    """One statistics pass (base.Accumulator): `feed(block, sums)` adds each block's terms
    to `sums`, `finish` runs once after the last (on this pass's `sums`); `state` carries
    from pass to pass, and on to `combine`.

    With `split` (feed reads `state` and adds to `sums` only, each sum exact: exact.Sum,
    select.OrderStats...), lanes share the pass (base.Splittable): each feeds a `part()`
    with sums of its own, merged back into these before `finish`.
    """

    state: dict[str, Any]
    feed: Callable[[Block, Sequence[Any]], None] = field(default=lambda block, sums: None)
    finish: Callable[[], None] = field(default=lambda: None)
    sums: Sequence[Any] = ()
    split: bool = False

    def update(self, block: Block) -> None:
        self.feed(block, self.sums)

    def result(self) -> dict[str, Any]:
        self.finish()
        return self.state

    def part(self) -> Pass | None:
        if not self.split:
            return None
        return Pass(self.state, self.feed, sums=[s.part() for s in self.sums], split=True)

    def merge(self, part: Pass) -> None:
        for mine, theirs in zip(self.sums, part.sums, strict=True):
            mine.merge(theirs)
