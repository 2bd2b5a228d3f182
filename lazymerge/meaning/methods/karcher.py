"""`karcher` (docs/methods.md, The geometric methods): mergekit 0.1.5's weighted Karcher
mean of all the inputs (the base, when there is one, is just one more) on the unit sphere,
scaled by their mean norm.

Every whole-tensor quantity of mergekit's iteration is one statistics pass: the inputs'
norms, the first mean's norm, then for each of up to `max_iter` iterations the mean's dot
products with the units, the tangent's norm and the new mean's norm: 2 + 3·max_iter
passes. mergekit keeps the mean in memory; a pass recomputes it on each block from the
rows and the scalars of the passes before (so iteration j costs j steps per block). Once
mergekit would stop (the tangent's norm below `tol`), the remaining passes read nothing.
Norms and the tangent work in float32 (float64), the rest in the compute dtype d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.meaning.methods.base import Block, Method, Resolved, Scalar
from lazymerge.meaning.methods.geometry import Pass, Sum, dtype_of, rounded, wide

if TYPE_CHECKING:
    import torch

DOTS, TANGENT, NEW_MEAN = 0, 1, 2  # an iteration's passes


@dataclass(frozen=True)
class Karcher(Method):
    name = "karcher"
    blocks_at_once = True  # combine: the mean replayed from the passes' scalars, per element
    tensor: str
    compute: str
    inputs: tuple[int, ...]  # plan indices of every input, in the recipe's order
    max_iter: int
    tol: float

    def stat_passes(self) -> int:
        return 0 if len(self.inputs) == 1 else 2 + 3 * self.max_iter

    def stats_pass(self, k: int, prior: Any) -> Pass:
        state: dict[str, Any] = prior if k else {"steps": [], "done": False}
        dots = k >= 2 and (k - 2) % 3 == DOTS
        terms = len(self.inputs) if k == 0 else len(state["valid"]) if dots else 1
        sums = [Sum() for _ in range(terms)]

        def feed(block: Block, into: Sequence[Sum]) -> None:
            if state["done"]:  # converged, or nothing to average: read nothing
                return
            for s, v in zip(into, self._measured(k, block, state), strict=True):
                s.add(v.double().reshape(block.stop - block.start, -1))

        def finish() -> None:
            import torch

            if not state["done"]:
                exact = [s.rounded(torch.float64) for s in sums]
                self._finish(k, [float(e) for e in exact], state)

        return Pass(state, feed, finish, sums, split=True)

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        d = dtype_of(self.compute)
        x = [block.rows(i, dtype=d) for i in self.inputs]
        if len(x) == 1:
            return x[0]
        if not stats["valid"]:  # every norm at or below tol: mergekit's zeros
            return sum(t * 0 for t in x)  # type: ignore[return-value]
        units = self._units(x, stats)
        mean = self._mean(units, stats, len(stats["steps"]))
        scale: torch.Tensor = stats["scale"]
        return scale * mean

    def describe(self) -> str:
        return f"karcher max_iter={self.max_iter} tol={self.tol:g}"

    def _measured(self, k: int, block: Block, state: dict[str, Any]) -> list[torch.Tensor]:
        """What pass k sums the squares or products of on this block (its terms)."""
        w = wide(dtype_of(self.compute))
        x = [block.rows(i, dtype=dtype_of(self.compute)) for i in self.inputs]
        if k == 0:
            return [t.to(w).double().square() for t in x]
        units = self._units(x, state)
        if k == 1:
            return [self._first_mean(units, state).to(w).double().square()]
        j, part = divmod(k - 2, 3)
        mean = self._mean(units, state, j)
        if part == DOTS:  # torch.dot in d: exact products, summed
            return [mean.double() * units[v].double() for v in range(len(units))]
        tangent = self._tangent(units, mean, state, j)
        if part == TANGENT:
            return [tangent.to(w).double().square()]
        return [self._moved(mean, tangent, state["steps"][j]).to(w).double().square()]

    def _finish(self, k: int, exact: list[float], state: dict[str, Any]) -> None:
        """The scalars of pass k, and mergekit's branches on them."""
        import torch

        d, w = dtype_of(self.compute), wide(dtype_of(self.compute))
        if k == 0:
            norms = [rounded(math.sqrt(e), w) for e in exact]
            valid = [v for v, n in enumerate(norms) if n.item() > self.tol]
            alphas = [1.0 / len(self.inputs)] * len(self.inputs)
            total = sum(alphas[v] for v in valid)
            state.update(norms=norms, valid=valid, alphas=[alphas[v] / total for v in valid])
            state["scale"] = sum(a * n for a, n in zip(alphas, norms, strict=True))
            state["done"] = not valid
        elif k == 1:
            state["mean_norm"] = rounded(math.sqrt(exact[0]), w)
        else:
            j, part = divmod(k - 2, 3)
            if part == DOTS:
                dots = [rounded(e, d).clamp(-1.0, 1.0) for e in exact]
                thetas = [torch.arccos(dot) for dot in dots]
                state["steps"].append({"dots": dots, "thetas": thetas})
            elif part == TANGENT:
                tangent_norm = rounded(math.sqrt(exact[0]), w)
                state["steps"][j]["tangent_norm"] = tangent_norm
                if tangent_norm.item() < self.tol:  # mergekit's break: this mean is the last
                    state["steps"].pop()
                    state["done"] = True
            else:
                unit_norm = rounded(math.sqrt(exact[0]), w)
                state["steps"][j]["unit_norm"] = unit_norm if unit_norm.item() > self.tol else None

    def _units(self, x: list[torch.Tensor], state: dict[str, Any]) -> list[torch.Tensor]:
        """The valid inputs divided by their norms, in d."""
        return [(x[v] / state["norms"][v]).to(x[v].dtype) for v in state["valid"]]

    def _first_mean(self, units: list[torch.Tensor], state: dict[str, Any]) -> torch.Tensor:
        import torch

        mean = torch.zeros_like(units[0])
        for alpha, unit in zip(state["alphas"], units, strict=True):
            mean += alpha * unit
        return mean

    def _mean(self, units: list[torch.Tensor], state: dict[str, Any], steps: int) -> torch.Tensor:
        """The mean after `steps` iterations, replayed on the block."""
        mean = self._first_mean(units, state)
        if state["mean_norm"].item() < self.tol:
            mean = units[0].clone()
        else:
            mean = (mean / state["mean_norm"]).to(mean.dtype)
        for j, step in enumerate(state["steps"][:steps]):
            mean = self._moved(mean, self._tangent(units, mean, state, j), step)
            if step["unit_norm"] is not None:
                mean = (mean / step["unit_norm"]).to(mean.dtype)
        return mean

    def _tangent(
        self, units: list[torch.Tensor], mean: torch.Tensor, state: dict[str, Any], j: int
    ) -> torch.Tensor:
        """Iteration j's tangent at `mean`: the units' log maps, weighted (in d)."""
        import torch

        step = state["steps"][j]
        tangent = torch.zeros_like(mean)
        for v, (alpha, unit) in enumerate(zip(state["alphas"], units, strict=True)):
            theta, dot = step["thetas"][v], step["dots"][v]
            if theta.item() < self.tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        return tangent

    def _moved(
        self, mean: torch.Tensor, tangent: torch.Tensor, step: Mapping[str, Any]
    ) -> torch.Tensor:
        """The exponential map: the mean moved along the tangent, in d."""
        import torch

        norm: torch.Tensor = step["tangent_norm"]
        return (torch.cos(norm) * mean + torch.sin(norm) * (tangent / norm)).to(mean.dtype)


def check(name: str, shared: Mapping[str, Scalar], per_input: Mapping[str, Scalar]) -> None:
    """`max_iter` a whole number >= 0 (mergekit's int; a gradient may interpolate it)."""
    steps = float(shared.get("max_iter", 10))
    if steps != int(steps) or steps < 0:
        raise ValueError(f"{name}: max_iter {steps:g} is not a whole number >= 0")


def build(call: Resolved) -> Karcher:
    """karcher's call: every input, base included, in the recipe's order; `max_iter`, `tol`."""
    return Karcher(
        tensor=call.tensor,
        compute=call.compute,
        inputs=call.order,
        max_iter=int(call.shared["max_iter"]),
        tol=float(call.shared["tol"]),
    )
