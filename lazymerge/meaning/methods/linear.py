"""`linear`: a weighted sum of the inputs, `sum_i w_i * x_i`, in float32.

The gradient blend of DESIGN §2 is this method over (base, other) with weights
(1 - r, r). Rows only the base has (a smaller vocabulary in the other model) are the
base's, unweighted (BlockMerge's behaviour).

The order of operations is part of the bytes: each input is scaled in place (a weight of
1 is no multiplication), then added to the sum in input order; an input whose weight is 0
is never read, and a sum of one term is that term, copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazymerge.meaning.methods.base import Block, Method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Linear(Method):
    name = "linear"
    weights: tuple[float, ...]  # one per input, the base first

    def combine(self, block: Block, stats: object = None) -> torch.Tensor:
        n, shared = block.stop - block.start, block.shared
        w0 = self.weights[0]
        acc = None
        fresh = False  # acc[:shared] holds no term yet (the base's weight is 0)
        if w0 != 0 or shared < n:
            acc = block.rows(0)
            fresh = w0 == 0
            if w0 not in (0, 1) and shared:
                acc[:shared].mul_(w0)
        for i, w in enumerate(self.weights[1:], start=1):
            if w == 0 or not shared:
                continue
            x = block.rows(i, shared)
            if w != 1:
                x.mul_(w)
            if acc is None:
                acc = x
            elif fresh:
                acc[:shared].copy_(x)
            else:
                acc[:shared].add_(x)
            fresh = False
        if acc is None:
            raise ValueError(f"linear: every weight is 0 ({self.weights}); nothing to sum")
        return acc

    def describe(self) -> str:
        return "linear " + ", ".join(f"{w:.4f}" for w in self.weights)
