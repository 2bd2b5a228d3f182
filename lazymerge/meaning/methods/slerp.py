"""`slerp` and `nuslerp` (docs/methods.md, The geometric methods): spherical interpolation
between two tensors, mergekit 0.1.5's arithmetic on the block's rows.

`slerp` interpolates the base toward the other model by `t` over the flattened tensors:
float32 coefficients (float64 for float64) from the whole tensors' norms and dot product
(one statistics pass), applied to every element in float32, rounded to the compute dtype.

`nuslerp` interpolates two models (or their task vectors, given a base) with
`t = w_2 / (w_1 + w_2)`, every step in the compute dtype. A vector is the flattened tensor
(`nuslerp_flatten`, the default), each row, or each column (`nuslerp_row_wise`): whole
tensors and columns take two passes (norms, then the cosines of the normalised vectors);
rows are whole in every block and take none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.meaning.methods.base import Block, Method, Resolved, Scalar
from lazymerge.meaning.methods.exact import f64
from lazymerge.meaning.methods.geometry import (
    ROWS,
    WHOLE,
    Pass,
    Sum,
    VectorSums,
    dtype_of,
    last_sums,
    rounded,
    vectors,
    wide,
)

if TYPE_CHECKING:
    import torch

# slerp's sums: elements whose float64 products are formed at once (a lane's temporaries)
PRODUCTS = 2**16
DOT_THRESHOLD = 0.9995  # slerp: |cos| above it is colinear, interpolated linearly
NORM_EPS = 1e-8  # slerp: a norm at or below it counts as 1
COLINEAR_EPS = 1e-8  # nuslerp: colinear where 1 - cos² <= eps²
UNIT_EPS = 1e-7  # nuslerp: the smallest norm a vector is divided by


@dataclass(frozen=True)
class Slerp(Method):
    """mergekit's `slerp` of the base (input 0) toward the other model (input 1)."""

    name = "slerp"
    blocks_at_once = True  # combine: two coefficients, element by element
    tensor: str
    compute: str
    t: float

    def stat_passes(self) -> int:
        return 1

    def stats_pass(self, k: int, prior: Any) -> Pass:
        sums = (Sum(), Sum(), Sum())  # Σa², Σb², Σab over the whole tensors, exact products
        state: dict[str, Any] = {}

        def feed(block: Block, into: Sequence[Sum]) -> None:
            # In d, then float64 a few rows at a time (the values _wide gives, exactly; small
            # temporaries in each lane).
            da, db = (block.rows(i, dtype=dtype_of(self.compute)) for i in (0, 1))
            step = max(1, PRODUCTS // max(da[:1].numel(), 1))
            for r in range(0, len(da), step):
                a, b = f64(da[r : r + step]), f64(db[r : r + step])
                for s, (x, y) in zip(into, ((a, a), (b, b), (a, b)), strict=True):
                    s.add(x * y)  # one product at a time

        def finish() -> None:
            import torch

            exact = [float(s.rounded(torch.float64)) for s in sums]
            state["coefficients"] = self.coefficients(*exact)

        return Pass(state, feed, finish, sums, split=True)

    def coefficients(self, aa: float, bb: float, ab: float) -> tuple[torch.Tensor, torch.Tensor]:
        """mergekit's (coef_a, coef_b), [1, 1] tensors in float32 (float64), from Σa², Σb²
        and Σab: its norms rounded, the dot of the normalised vectors, the colinear test."""
        import torch

        w = wide(dtype_of(self.compute))
        norm_a, norm_b = (
            torch.tensor([[math.sqrt(v)]], dtype=torch.float64).to(w) for v in (aa, bb)
        )
        norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
        norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
        cos = ab / (float(norm_a) * float(norm_b))
        dot = torch.tensor([[cos]], dtype=torch.float64).to(w).clamp(-1, 1)
        t = torch.tensor([[self.t]], dtype=w)
        linear = dot.abs() > DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        return coef_a, coef_b

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        coefficients: tuple[torch.Tensor, torch.Tensor] = stats["coefficients"]
        coef_a, coef_b = coefficients
        x, y = (self._wide(block, i) for i in (0, 1))
        # coef_a * x + coef_b * y, in place (x and y are this block's own: no temporaries)
        mixed = x.mul_(coef_a.view(())).add_(y.mul_(coef_b.view(())))
        return mixed.to(dtype_of(self.compute))

    def describe(self) -> str:
        return f"slerp t={self.t:.4g}"

    def _wide(self, block: Block, i: int) -> torch.Tensor:
        """Input i's rows cast to the compute dtype, then to float32 (float64) to work in."""
        d = dtype_of(self.compute)
        return block.rows(i, dtype=d).to(wide(d))


@dataclass(frozen=True)
class Nuslerp(Method):
    """mergekit's `nuslerp` of two models (or task vectors) by their weights."""

    name = "nuslerp"
    blocks_at_once = True  # combine: the cosines, element by element
    tensor: str
    compute: str
    weights: tuple[float, float]
    models: tuple[int, int]  # plan indices of the two models, in the recipe's order
    base: int | None  # plan index of the base; None: the models themselves are interpolated
    mode: str  # geometry.WHOLE, ROWS or COLUMNS: what one vector is

    @property
    def t(self) -> float:
        total = sum(self.weights)
        return 0.5 if abs(total) < 1e-6 else self.weights[1] / total

    def stat_passes(self) -> int:
        return 0 if self.mode == ROWS else 2

    def stats_pass(self, k: int, prior: Any) -> Pass:
        state: dict[str, Any] = prior if k else {}
        d = dtype_of(self.compute)
        sums = (VectorSums(self.mode), VectorSums(self.mode))

        def feed(block: Block, into: Sequence[VectorSums]) -> None:
            _, v0, v1 = self._vectors(block)
            if k == 0:
                into[0].add(f64(v0).square())
                into[1].add(f64(v1).square())
            else:
                n0, n1 = state["norms"]
                into[0].add((v0 / n0) * (v1 / n1))

        def finish() -> None:
            if k == 0:
                state["norms"] = tuple(_norm(s.exact(), d) for s in sums)
            else:
                state["cos"] = rounded(sums[0].exact(), d).reshape(state["norms"][0].shape)

        # Columns' sums are folded row by row, in order: that pass stays on one lane.
        return Pass(state, feed, finish, sums, split=self.mode == WHOLE)

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        b, v0, v1 = self._vectors(block)
        if self.mode == ROWS:
            d = dtype_of(self.compute)
            n0, n1 = (_norm(last_sums(f64(v).square()), d) for v in (v0, v1))
            cos = rounded(last_sums((v0 / n0) * (v1 / n1)), d)
        else:
            cos = stats["cos"]
        mixed = self._interpolate(v0, v1, cos.clamp(-1, 1))
        return mixed if b is None else b + mixed

    def describe(self) -> str:
        weights = "/".join(f"{w:g}" for w in self.weights)
        of = "" if self.base is not None else " (no base)"
        return f"nuslerp w={weights} t={self.t:.4g} {self.mode}{of}"

    def _interpolate(self, v0: torch.Tensor, v1: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """mergekit's nuslerp() on vectors whose cosines are `cos` (broadcast over them)."""
        import torch

        t = self.t
        colinear = (1 - cos.square()) <= COLINEAR_EPS**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        sin_theta = torch.sin(theta)
        result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
        return torch.where(colinear, (1 - t) * v0 + t * v1, result)

    def _vectors(self, block: Block) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(the base's rows or None, the two vectors), in the compute dtype."""
        d = dtype_of(self.compute)
        b = None if self.base is None else block.rows(self.base, dtype=d)
        x0, x1 = (block.rows(i, dtype=d) for i in self.models)
        return (None, x0, x1) if b is None else (b, x0 - b, x1 - b)


def _norm(exact: torch.Tensor, d: torch.dtype) -> torch.Tensor:
    """torch.norm in `d` from a float64 sum of squares, clamped as nuslerp's _normalize."""
    return rounded(exact.sqrt(), d).reshape(exact.shape or (1,)).clamp(min=UNIT_EPS)


def roles(call: Resolved) -> tuple[int | None, tuple[int, ...]]:
    """(the base's plan index, or None without one; the other inputs in the recipe's order)."""
    base = 0 if call.has_base else None
    return base, tuple(i for i in call.order if i != base)


def build_slerp(call: Resolved) -> Slerp:
    """slerp's call for one tensor: the shared `t`; the base and exactly one other model."""
    if len(call.per_input) != 2:
        raise ValueError(f"slerp: {call.tensor}: {len(call.per_input)} inputs, not two")
    return Slerp(tensor=call.tensor, compute=call.compute, t=float(call.shared["t"]))


def build_nuslerp(call: Resolved) -> Nuslerp:
    """nuslerp's call: each model's `weight`, `nuslerp_flatten`, `nuslerp_row_wise`."""
    base, models = roles(call)
    if len(models) != 2:
        raise ValueError(f"nuslerp: {call.tensor}: {len(models)} models besides the base, not two")
    flatten, along_rows = (bool(call.shared[k]) for k in ("nuslerp_flatten", "nuslerp_row_wise"))
    return Nuslerp(
        tensor=call.tensor,
        compute=call.compute,
        weights=(
            float(call.per_input[models[0]]["weight"]),
            float(call.per_input[models[1]]["weight"]),
        ),
        models=(models[0], models[1]),
        base=base,
        mode=vectors(call.shape, flatten, along_rows),
    )


def check(name: str, shared: Mapping[str, Scalar], per_input: Mapping[str, Scalar]) -> None:
    """slerp's `t` lies on the arc between its two models: [0, 1] (mergekit extrapolates
    past it silently, into weights no model had)."""
    t = float(shared.get("t", 0.0))
    if not 0.0 <= t <= 1.0:
        raise ValueError(
            f"t {t:g} is outside [0, 1]; slerp runs from the base (0) to the other (1)"
        )
