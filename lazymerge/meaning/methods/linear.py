"""`linear`: a weighted sum of the inputs, `sum_i w_i * x_i`, in float32.

The gradient blend of DESIGN §2 is this method over (base, other) with weights
(1 - r, r). Rows only the base has (a smaller vocabulary in the other model) are the
base's, unweighted (BlockMerge's behaviour).

The order of operations is part of the bytes: each input is scaled in place (a weight of
1 is no multiplication), then added to the sum in input order; an input whose weight is 0
is never read, and a sum of one term is that term, copied.

`Weighted` is mergekit's `linear` over N inputs (a mergekit recipe), with mergekit's own
rounding: fp32 coefficients and fused multiply-adds in the recipe's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazymerge.meaning.methods.base import Block, Method, Resolved

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


@dataclass(frozen=True)
class Weighted(Method):
    """mergekit's `linear` over N inputs (docs/methods.md, linear): coefficients in fp32
    (fp64 when the compute dtype is), one fused multiply-add per input in the recipe's
    order starting from zeros, an optional division by the coefficients' sum, one
    rounding to the compute dtype. The fused `addcmul_` and the order are part of the
    bytes: a multiply then an add differs in about one element in five.
    """

    name = "linear"
    weights: tuple[float, ...]  # one per input, the base (index 0) first
    order: tuple[int, ...]  # the inputs in the recipe's order, the order they are summed in
    normalize: bool
    compute: str  # dtype code of the inputs' values and of the result

    def combine(self, block: Block, stats: object = None) -> torch.Tensor:
        import torch

        from lazymerge.read.mapped import DTYPES

        dtype = DTYPES[self.compute]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = [block.rows(i, dtype=dtype) for i in self.order]
        # mergekit's shapes: a leading axis of groups, coefficients (groups, 1, ...).
        shape = (1,) + (1,) * x[0].dim()
        coefficients = torch.tensor([[self.weights[i] for i in self.order]], dtype=acc)
        result = torch.zeros((1, *x[0].shape), dtype=acc, device=x[0].device)
        for xi, c in zip(x, coefficients.unbind(1), strict=True):
            result.addcmul_(xi.unsqueeze(0), c.reshape(shape).to(result.device))
        if self.normalize:
            result.div_(coefficients.sum(dim=1).reshape(shape).to(result.device))
        return result.to(dtype)[0]

    def describe(self) -> str:
        weights = "/".join(f"{self.weights[i]:g}" for i in self.order)
        return f"linear w={weights}" + (" normalize" if self.normalize else "")


def build_weighted(call: Resolved) -> Weighted:
    """mergekit's `linear` for one tensor: every input's `weight`, the shared `normalize`."""
    return Weighted(
        weights=tuple(float(p["weight"]) for p in call.per_input),
        order=call.order,
        normalize=bool(call.shared["normalize"]),
        compute=call.compute,
    )
