"""`model_stock` (docs/methods.md, The geometric methods): mergekit 0.1.5's Model Stock,
every step in the compute dtype d.

The models' offsets from the base give the mean cosine `c` over every pair of models;
with `n` models, `t = n·c / (1 + (n-1)·c)` (0 where the denominator vanishes) and the
result is `t·mean(models) + (1-t)·base`. Over the flattened tensor (the default, one
statistics pass for the norms and dot products) or, with `filter_wise`, per row (a 1-D
tensor is one row: one pass; otherwise every block holds its rows whole, none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

from lazymerge.meaning.methods.base import Block, Method, Resolved
from lazymerge.meaning.methods.exact import f64
from lazymerge.meaning.methods.geometry import (
    ROWS,
    WHOLE,
    Pass,
    VectorSums,
    dtype_of,
    last_sums,
    rounded,
    vectors,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelStock(Method):
    name = "model_stock"
    blocks_at_once = True  # combine: t, element by element (or each row's own)
    tensor: str
    compute: str
    models: tuple[int, ...]  # plan indices of the models besides the base, recipe order
    mode: str  # geometry.WHOLE (flattened, or a 1-D tensor) or ROWS (filter_wise)

    def stat_passes(self) -> int:
        return 1 if self.mode == WHOLE else 0

    def stats_pass(self, k: int, prior: Any) -> Pass:
        pairs = list(combinations(range(len(self.models)), 2))
        squares = [VectorSums(WHOLE) for _ in self.models]
        products = [VectorSums(WHOLE) for _ in pairs]
        state: dict[str, Any] = {}

        def feed(block: Block, into: Sequence[VectorSums]) -> None:
            _, _, offsets = self._inputs(block)
            n = len(offsets)  # into: the squares, then the products
            for s, o in zip(into[:n], offsets, strict=True):
                s.add(f64(o).square())
            for s, (a, b) in zip(into[n:], pairs, strict=True):
                s.add(offsets[a] * offsets[b])  # rounded in d, as mergekit's

        def finish() -> None:
            d = dtype_of(self.compute)
            norms = [rounded(s.exact().sqrt(), d) for s in squares]
            dots = [rounded(s.exact(), d) for s in products]
            state["t"] = self._ratio(norms, dots)

        return Pass(state, feed, finish, [*squares, *products], split=True)

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        base, models, offsets = self._inputs(block)
        if self.mode == ROWS:
            d = dtype_of(self.compute)
            norms = [rounded(last_sums(f64(o).square()).sqrt(), d).squeeze(-1) for o in offsets]
            pairs = combinations(range(len(offsets)), 2)
            dots = [rounded(last_sums(offsets[a] * offsets[b]), d).squeeze(-1) for a, b in pairs]
            t = self._ratio(norms, dots)
        else:
            t = stats["t"]
        average = sum(models) / len(models)
        result: torch.Tensor = t * average + (1 - t) * base
        return result

    def describe(self) -> str:
        return "model_stock" + (" filter_wise" if self.mode == ROWS else "")

    def _inputs(self, block: Block) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The base's rows, the models', and their offsets from the base, in d."""
        d = dtype_of(self.compute)
        base = block.rows(0, dtype=d)
        models = [block.rows(i, dtype=d) for i in self.models]
        return base, models, [m - base for m in models]

    def _ratio(self, norms: list[torch.Tensor], dots: list[torch.Tensor]) -> torch.Tensor:
        """mergekit's t from each offset's norm and each pair's dot product (per vector)."""
        import torch

        cosines = []
        for (a, b), dot in zip(combinations(range(len(norms)), 2), dots, strict=True):
            norm_product = norms[a] * norms[b]
            cosines.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        count = len(norms)
        denominator = 1 + (count - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def build(call: Resolved) -> ModelStock:
    """model_stock's call: the models besides the base (two at least), `filter_wise`."""
    models = tuple(i for i in call.order if i != 0)
    if len(models) < 2:
        raise ValueError(f"model_stock: {call.tensor}: {len(models)} model(s) besides the base")
    filter_wise = bool(call.shared["filter_wise"])
    mode = vectors(call.shape, not filter_wise, False)
    return ModelStock(tensor=call.tensor, compute=call.compute, models=models, mode=mode)
