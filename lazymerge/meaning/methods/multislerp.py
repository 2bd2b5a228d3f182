"""`multislerp` (docs/methods.md, The geometric methods): mergekit 0.1.5's barycentric
interpolation on the hypersphere, every step in the compute dtype d.

Each model (its task vector, given a base) is flattened and divided by its norm; the
weighted mean of those unit vectors, normalised, is the point the tangent space touches;
the weighted mean of the units' projections on it is mapped back to the sphere and
scaled by the weighted mean of the norms. Four whole-tensor quantities, one statistics
pass each, every pass recomputing the elementwise steps before it from the block's rows:
the norms, the mean's norm, the units' dot products with the normalised mean, the tangent
mean's norm. One model is returned as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.errors import NumericsError
from lazymerge.meaning.methods.base import Block, Method, Resolved
from lazymerge.meaning.methods.exact import f64
from lazymerge.meaning.methods.geometry import Pass, Sum, dtype_of, rounded
from lazymerge.meaning.methods.slerp import roles

if TYPE_CHECKING:
    import torch

NORMS, MEAN, DOTS, TANGENT = "norms", "mean", "dots", "tangent"


@dataclass(frozen=True)
class Multislerp(Method):
    name = "multislerp"
    blocks_at_once = True  # combine: the passes' scalars, element by element
    tensor: str
    shape: tuple[int, ...]
    compute: str
    weights: tuple[float, ...]  # one per model, in the recipe's order
    models: tuple[int, ...]  # plan indices of the models (all but the base), recipe order
    base: int | None  # plan index of the base; None: the models themselves are interpolated
    normalize_weights: bool
    eps: float

    def stat_passes(self) -> int:
        return 4 if len(self.models) > 1 else 0

    def stats_pass(self, k: int, prior: Any) -> Pass:
        stage = (NORMS, MEAN, DOTS, TANGENT)[k]
        state: dict[str, Any] = prior if k else {}
        sums = [Sum() for _ in self.models] if stage in (NORMS, DOTS) else [Sum()]

        def feed(block: Block, into: Sequence[Sum]) -> None:
            if state.get("fallback"):  # the mean's norm vanished: no projection to measure
                return
            _, flat = self._flat(block)
            if stage == NORMS:
                parts = [f64(t).square() for t in flat]
            elif stage == DOTS:  # each unit times the normalised mean, rounded in d
                steps = self._steps(flat, state, stage)
                parts = list(steps["unit"] * steps["mean"])
            else:  # the mean, the tangent mean
                parts = [f64(self._steps(flat, state, stage)[stage]).square()]
            for s, p in zip(into, parts, strict=True):
                s.add(p.reshape(block.stop - block.start, -1))

        def finish() -> None:
            self._finish(stage, state, sums)

        return Pass(state, feed, finish, sums, split=True)

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        if len(self.models) == 1:  # mergekit returns the one model as it is
            return block.rows(self.models[0], dtype=dtype_of(self.compute))
        b, flat = self._flat(block)
        shape = (block.stop - block.start, *self.shape[1:])
        weights: torch.Tensor = stats["weights"]
        if stats.get("fallback"):  # two antipodal models: mergekit interpolates linearly
            result: torch.Tensor = (flat[0] * weights[0] + flat[1] * weights[1]).view(shape)
        else:
            import torch

            steps = self._steps(flat, stats, None)
            tn: torch.Tensor = stats["tangent_norm"]
            result = steps["mean"] * torch.cos(tn) + steps[TANGENT] * (torch.sin(tn) / tn)
            result = (result * stats["avg_norm"]).view(shape)
        return result if b is None else result + b

    def describe(self) -> str:
        weights = "/".join(f"{w:g}" for w in self.weights)
        return (
            f"multislerp w={weights}"
            + (" normalize" if self.normalize_weights else "")
            + ("" if self.base is not None else " (no base)")
        )

    def _flat(self, block: Block) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the base's rows or None, the models' [n, elements] in d, less the base)."""
        import torch

        d = dtype_of(self.compute)
        b = None if self.base is None else block.rows(self.base, dtype=d)
        tensors = torch.stack([block.rows(i, dtype=d) for i in self.models])
        if b is not None:
            tensors -= b
        return b, tensors.view(len(self.models), -1)

    def _steps(self, flat: torch.Tensor, state: dict[str, Any], upto: str | None) -> dict[str, Any]:
        """mergekit's elementwise steps on the block, from the passes' scalars, as far as
        the quantity pass `upto` measures (None: all of them)."""
        weights = state["weights"].view(-1, 1)
        out: dict[str, Any] = {"unit": flat / state["scale"]}
        out["mean"] = (out["unit"] * weights).sum(0)
        if upto == MEAN:
            return out
        out["mean"] = out["mean"] / state["mean_norm"]
        if upto == DOTS:
            return out
        tangent = out["unit"] - state["dots"] * out["mean"]
        out[TANGENT] = (tangent * weights).sum(0)
        return out

    def _finish(self, stage: str, state: dict[str, Any], sums: list[Sum]) -> None:
        import torch

        d = dtype_of(self.compute)
        exact = [s.rounded(torch.float64) for s in sums]
        if stage == NORMS:
            norms = rounded(torch.stack(exact).sqrt(), d).view(-1, 1)
            weights = torch.tensor(self.weights, dtype=d)
            if self.normalize_weights:
                weights = weights / weights.sum()
            state.update(norms=norms, weights=weights, scale=norms + self.eps)
            state["avg_norm"] = (norms.squeeze(-1) * weights).sum()
        elif state.get("fallback"):
            return
        elif stage == MEAN:
            state["mean_norm"] = rounded(exact[0].sqrt(), d)
            if state["mean_norm"] < self.eps:
                if len(self.models) != 2:
                    raise NumericsError(
                        f"{self.tensor}: multislerp: the weighted mean of the unit vectors is "
                        "zero (antipodal models whose weights cancel; mergekit fails too); "
                        "change the weights"
                    )
                state["fallback"] = True
        elif stage == DOTS:
            state["dots"] = rounded(torch.stack(exact), d).view(-1, 1)
        else:
            state["tangent_norm"] = rounded(exact[0].sqrt(), d) + self.eps


def build(call: Resolved) -> Multislerp:
    """multislerp's call: each model's `weight`, `normalize_weights`, `eps`."""
    base, models = roles(call)
    if not models:
        raise ValueError(f"multislerp: {call.tensor}: no model besides the base")
    return Multislerp(
        tensor=call.tensor,
        shape=call.shape,
        compute=call.compute,
        weights=tuple(float(call.per_input[i]["weight"]) for i in models),
        models=models,
        base=base,
        normalize_weights=bool(call.shared["normalize_weights"]),
        eps=float(call.shared["eps"]),
    )
