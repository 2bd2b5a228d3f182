"""How a merge runs (not what it makes: that is the recipe and its plan)."""

from __future__ import annotations

from dataclasses import dataclass

from lazymerge.run.budget import DEFAULT_MAX_MEMORY
from lazymerge.write.output import Card


@dataclass(frozen=True)
class MergeOptions:
    max_memory: int = DEFAULT_MAX_MEMORY
    overwrite: bool = False  # replace a previous merge's files
    resume: bool = False  # keep the shards an interrupted attempt completed
    progress: bool = True
    allow_nonfinite: bool = False  # write NaN/Inf results instead of stopping
    device: str = "cpu"  # where the arithmetic runs: cpu, cuda, cuda:N or auto
    card: Card | None = None  # the model card, written once the shards are complete
    # Compute lanes blending a tensor's chunks on the CPU (bytes never depend on it);
    # 0: budget.merge_lanes (the cores, LAZYMERGE_LANES), 1: the main thread alone.
    lanes: int = 0
