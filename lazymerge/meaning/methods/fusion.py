"""`arcee_fusion` (docs/methods.md, The geometric methods): mergekit 0.1.5's Arcee Fusion
of the base and one model, in the compute dtype d.

Each element's importance is |x - b| times its row's KL divergence between softmax(x) and
softmax(b) (each + 1e-8) over the last dimension; an element takes the model's value where
its importance reaches `median + 1.5·(q3 - q1)` of all the importances, the base's
elsewhere. The result is float32 (mergekit multiplies by a float32 mask), float64 for
float64. The quartiles are exact order statistics at mergekit's ranks
`⌊q·(N-1)⌋` (q as float32): for a 2-D tensor from select.py's passes over the blocks'
importances (a negative importance, where the KL rounds below 0, or a NaN one, where a
float16 probability rounds to 0, ranked as torch.sort ranks them); a 1-D tensor is one
row, gathered whole and sorted. mergekit samples a million elements at random from a
larger tensor; lazymerge ranks them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.errors import RecipeError
from lazymerge.meaning.methods.base import Block, Method, Resolved
from lazymerge.meaning.methods.geometry import Pass, dtype_of, last_sums, rounded
from lazymerge.meaning.methods.task import SELECT_PASSES

if TYPE_CHECKING:
    import torch

QUARTILES = (0.25, 0.5, 0.75)
EPS = 1e-8  # added to each probability


class Quantiles:
    """Exact ascending order statistics of values that may be negative or NaN, in
    select.OrderStats' passes: the non-negative values (a NaN as +inf, a negative as 0) in
    one stream, the negative values' magnitudes (others as 0) in another. Ascending, torch
    ranks the negatives first, then the rest, the NaNs last."""

    def __init__(self, dtype: torch.dtype, ranks: tuple[int, ...]) -> None:
        from lazymerge.meaning.methods.select import OrderStats

        self.ranks = ranks
        self.high, self.low = OrderStats(dtype), OrderStats(dtype)
        self.negatives = self.nans = 0
        self.passes = self.high.passes
        self._done = 0

    def update(self, values: torch.Tensor) -> None:
        import torch

        negative, nan = values < 0, values.isnan()
        if self._done == 0:
            self.negatives += int(negative.sum())
            self.nans += int(nan.sum())
        zero = values.new_zeros(())
        high = torch.where(nan, values.new_full((), float("inf")), values)
        self.high.update(torch.where(negative, zero, high))
        self.low.update(torch.where(negative, -values, zero))

    def part(self) -> Quantiles:
        """Empty, in this pass, for a share of its blocks (`merge`: counts add exactly)."""
        part = Quantiles(self.high.dtype, self.ranks)
        part.high, part.low, part._done = self.high.part(), self.low.part(), self._done
        return part

    def merge(self, part: Quantiles) -> None:
        self.negatives += part.negatives
        self.nans += part.nans
        self.high.merge(part.high)
        self.low.merge(part.low)

    def next_pass(self) -> None:
        if self._done == 0:
            n, m = self.high.count, self.negatives
            self.high.next_pass([r for r in self.ranks if m <= r < n - self.nans])
            self.low.next_pass([n - 1 - r for r in self.ranks if r < m])
        else:
            self.high.next_pass()
            self.low.next_pass()
        self._done += 1

    def values(self) -> list[float]:
        """The value at each rank, after every pass."""
        n = self.high.count
        high = {c.rank: c.value for c in self.high.cuts()}
        low = {c.rank: c.value for c in self.low.cuts()}
        return [
            float("nan")
            if r >= n - self.nans
            else -low[n - 1 - r]
            if r < self.negatives
            else high[r]
            for r in self.ranks
        ]


def quartile_ranks(n: int) -> tuple[int, ...]:
    """mergekit's `(q * (n - 1)).long()`, q a float32 tensor."""
    import torch

    return tuple(int(r) for r in (torch.tensor(QUARTILES) * (n - 1)).long())


@dataclass(frozen=True)
class ArceeFusion(Method):
    name = "arcee_fusion"
    blocks_at_once = True  # combine: each element's importance against the threshold
    tensor: str
    shape: tuple[int, ...]
    compute: str

    def stat_passes(self) -> int:
        return 1 if len(self.shape) == 1 else SELECT_PASSES[self.compute]

    def stats_pass(self, k: int, prior: Any) -> Pass:
        import math

        state: dict[str, Any] = prior if k else {}
        if not k and len(self.shape) > 1:
            ranks = quartile_ranks(math.prod(self.shape))
            state["quantiles"] = Quantiles(dtype_of(self.compute), ranks)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []

        def feed(block: Block, into: Sequence[Quantiles]) -> None:
            b, x = self._inputs(block)
            if len(self.shape) == 1:  # one row: gathered whole
                parts.append((b, x))
            else:
                into[0].update(self._importance(b, x))

        def finish() -> None:
            if len(self.shape) == 1:
                self._gathered(state, parts)
                return
            quantiles: Quantiles = state["quantiles"]
            quantiles.next_pass()
            if k == self.stat_passes() - 1:
                state["threshold"] = self._threshold(quantiles.values())

        if len(self.shape) == 1:  # gathered in row order: one lane (a 1-D tensor is small)
            return Pass(state, feed, finish)
        return Pass(state, feed, finish, [state["quantiles"]], split=True)

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        b, x = self._inputs(block)
        if len(self.shape) == 1:
            importance = stats["importance"][block.start : block.stop]
        else:
            importance = self._importance(b, x)
        mask = (importance >= stats["threshold"]).float()
        result: torch.Tensor = b + (x - b) * mask
        return result

    def describe(self) -> str:
        return "arcee_fusion"

    def _inputs(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        d = dtype_of(self.compute)
        return block.rows(0, dtype=d), block.rows(1, dtype=d)

    def _importance(self, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """|x - b| times the row's KL(softmax(x) + eps ‖ softmax(b) + eps), all in d."""
        import torch
        import torch.nn.functional as F

        diff = (x - b).abs()
        p = F.softmax(x, dim=-1) + EPS
        q = F.softmax(b, dim=-1) + EPS
        kl = rounded(last_sums(p * torch.log(p / q)), x.dtype)
        return diff * kl

    def _gathered(
        self, state: dict[str, Any], parts: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """A 1-D tensor: its importance whole, its quartiles as mergekit's sort gives them."""
        import torch

        b, x = (torch.cat(side) for side in zip(*parts, strict=True))
        importance = self._importance(b, x)
        ranked = torch.sort(importance).values
        state["importance"] = importance
        state["threshold"] = self._threshold([float(ranked[r]) for r in quartile_ranks(len(b))])

    def _threshold(self, quartiles: list[float]) -> torch.Tensor:
        """median + 1.5·(q3 - q1), each step in d."""
        import torch

        q1, median, q3 = (torch.tensor(v, dtype=dtype_of(self.compute)) for v in quartiles)
        return median + 1.5 * (q3 - q1)


def build(call: Resolved) -> ArceeFusion:
    """arcee_fusion's call: no parameters; the base and exactly one other model."""
    if len(call.per_input) != 2:
        raise ValueError(f"arcee_fusion: {call.tensor}: {len(call.per_input)} inputs, not two")
    if call.compute == "F64":
        raise RecipeError(
            f"arcee_fusion: {call.tensor}: dtype float64 is not supported (exact quartiles "
            "of float64 importances are not implemented); use float32"
        )
    return ArceeFusion(tensor=call.tensor, shape=call.shape, compute=call.compute)
