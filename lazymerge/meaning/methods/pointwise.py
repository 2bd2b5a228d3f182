"""`nearswap` and `passthrough` (docs/methods.md, The geometric methods): mergekit 0.1.5's
element-by-element methods, in the compute dtype d, no statistics pass.

`nearswap` moves each base element toward the model's by `w = clamp(t / |b - x|, 0, 1)`
(`|b - x|` at least 1e-6): elements closer than `t` take the model's value, farther ones
keep more of the base's. `passthrough` is its one input, optionally scaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazymerge.meaning.methods.base import Block, Method, Resolved
from lazymerge.meaning.methods.geometry import dtype_of

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Nearswap(Method):
    name = "nearswap"
    compute: str
    t: float

    def combine(self, block: Block, stats: object = None) -> torch.Tensor:
        d = dtype_of(self.compute)
        a, b = block.rows(0, dtype=d), block.rows(1, dtype=d)
        # t / tensor is torch's reciprocal, then a multiplication by t (Tensor.__rtruediv__)
        weight = (self.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        result: torch.Tensor = weight * b + (1 - weight) * a
        return result

    def describe(self) -> str:
        return f"nearswap t={self.t:g}"


@dataclass(frozen=True)
class Passthrough(Method):
    name = "passthrough"
    compute: str
    scale: float  # 1: the input as it is (mergekit's default, no scale)

    def combine(self, block: Block, stats: object = None) -> torch.Tensor:
        x = block.rows(0, dtype=dtype_of(self.compute))
        return x if self.scale == 1 else x * self.scale

    def describe(self) -> str:
        return "passthrough" + (f" scale={self.scale:g}" if self.scale != 1 else "")


def build_nearswap(call: Resolved) -> Nearswap:
    """nearswap's call: the shared `t`; the base and exactly one other model."""
    if len(call.per_input) != 2:
        raise ValueError(f"nearswap: {call.tensor}: {len(call.per_input)} inputs, not two")
    return Nearswap(compute=call.compute, t=float(call.shared["t"]))


def build_passthrough(call: Resolved) -> Passthrough:
    """passthrough's call: its one input's `scale`."""
    if len(call.per_input) != 1:
        raise ValueError(f"passthrough: {call.tensor}: {len(call.per_input)} inputs, not one")
    return Passthrough(compute=call.compute, scale=float(call.per_input[0]["scale"]))
