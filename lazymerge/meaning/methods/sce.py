"""`sce` (docs/methods.md, sce): mergekit 0.1.5's select, calculate, erase.

All in the compute dtype d with mergekit's torch operations, block by block:
1. `τ_i = x_i - b`; with `select_topk < 1`, one mask for all inputs keeps the
   `k = ⌊Z·select_topk⌋` (an fp32 product) largest variances over the inputs, Z being
   the nonzero ones: exact order statistics (select.py), ties by flat index;
2. the sign vote on the unweighted (masked) τ (vote.erased_sums: mergekit's, in fp32);
3. `ω_i` from mean(τ_i²) over the whole tensor (exact.Sum, rounded as mergekit's mean
   rounds: fp32, divided by N, then d), normalised to sum 1;
4. `b + Σ τ_i ω_i m_i / max(Σ ω_i m_i, 1e-6)`.
Passes: the variances' order statistics (one for 16-bit d, two for fp32), then the sums
of squares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.meaning.methods.base import Block, Method, Resolved, Scalar
from lazymerge.meaning.methods.exact import Sum
from lazymerge.meaning.methods.stats import Stats
from lazymerge.meaning.methods.task import SELECT_PASSES, dtype_of
from lazymerge.meaning.methods.vote import erased_sums

if TYPE_CHECKING:
    import torch

    from lazymerge.meaning.methods.select import RankMask


def check(name: str, shared: Mapping[str, Scalar], per_input: Mapping[str, Scalar]) -> None:
    """Plan-time check of `select_topk` (the per-input parameters are unused)."""
    topk = float(shared.get("select_topk", 1.0))
    if not 0 < topk <= 1:
        raise ValueError(f"{name}: select_topk {topk:g} is outside (0, 1]")


@dataclass(frozen=True)
class Sce(Method):
    name = "sce"
    blocks_at_once = True  # the top-k mask orders its tie counts itself (select.RankMask)
    tensor: str
    shape: tuple[int, ...]
    compute: str
    inputs: int  # non-base inputs
    select_topk: float
    int8_mask: bool

    def stages(self) -> tuple[str, ...]:
        if not self.inputs:
            return ()
        select = ("select",) * SELECT_PASSES[self.compute] if 0 < self.select_topk < 1 else ()
        return (*select, "weights")

    def stat_passes(self) -> int:
        return len(self.stages())

    def stats_pass(self, k: int, prior: Any) -> Stats:
        stats = prior if isinstance(prior, Stats) else self._start()
        stage = self.stages()[k]
        if stage == "weights":
            self._fresh_mask(stats)
            stats.sums = {i: (Sum(),) for i in range(self.inputs)}

        def feed(block: Block, into: Stats) -> None:
            _, tvs = self._vectors(block)
            if stage == "select":
                var = self._variance(tvs)
                if k == 0:
                    into.counts["nonzero"] += int(var.count_nonzero())
                into.order[0].update(var)
                return
            tvs = self._select(tvs, into.masks.get(0), block)
            for i in range(self.inputs):
                into.sums[i][0].add(tvs[i].square())

        def finish() -> None:
            if stage == "select":
                stats.order[0].next_pass(self._ranks(stats) if k == 0 else None)
            else:
                stats.extra["weights"] = self._weights([s for (s,) in stats.sums.values()])
                self._fresh_mask(stats)

        stats.feed, stats.finish, stats.split = feed, finish, True
        return stats

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        b, tvs = self._vectors(block)
        if not self.inputs:
            return b
        assert isinstance(stats, Stats)
        tvs = self._select(tvs, stats.masks.get(0), block)
        weights = stats.extra["weights"].to(b.device)
        while weights.dim() < tvs.dim():
            weights = weights.unsqueeze(-1)
        # the vote as mergekit's, in fp32 (vote.erased_sums; int8_mask: the same mask)
        merged, divisor = erased_sums(tvs, weights)
        final: torch.Tensor = b + merged / divisor.clamp(min=1e-6)
        return final

    def describe(self) -> str:
        return "sce" + (f" topk={self.select_topk:g}" if self.select_topk < 1 else "")

    def _vectors(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's rows and the stacked task vectors, in d."""
        import torch

        d = dtype_of(self.compute)
        b = block.rows(0, dtype=d)
        if not self.inputs:
            return b, b.unsqueeze(0)
        return b, torch.stack([block.rows(i, dtype=d) - b for i in range(1, self.inputs + 1)])

    def _mask_dtype(self) -> torch.dtype:
        import torch

        return torch.int8 if self.int8_mask else dtype_of(self.compute)

    def _variance(self, tvs: torch.Tensor) -> torch.Tensor:
        """|var| over the inputs as mergekit ranks it (float64 ones as float32)."""
        import torch

        v = torch.var(tvs, dim=0, unbiased=False).abs()
        return v.float() if v.dtype == torch.float64 else v

    def _select(self, tvs: torch.Tensor, mask: RankMask | None, block: Block) -> torch.Tensor:
        if mask is None:  # select_topk >= 1
            return tvs
        # |var| widened to float32 exactly (float64 ones were ranked as float32 already)
        keep = mask.weights(self._variance(tvs).float(), block.start * math.prod(self.shape[1:]))
        return tvs * keep.to(self._mask_dtype()).unsqueeze(0)

    def _ranks(self, stats: Stats) -> tuple[int, ...]:
        """After the first pass: k from the nonzero count, in fp32 as mergekit's
        `int(count_nonzero(var) * density)` is; the rank the k largest start at."""
        import torch

        from lazymerge.meaning.methods.select import range_ranks

        n = math.prod(self.shape)
        k = int(torch.tensor(stats.counts["nonzero"]) * self.select_topk)
        stats.extra["keep"] = k
        return range_ranks(n - k, n, n) if k else ()

    def _fresh_mask(self, stats: Stats) -> None:
        from lazymerge.meaning.methods.select import RankMask

        n = math.prod(self.shape)
        if self.select_topk <= 0:
            stats.masks[0] = RankMask.nothing()
        elif self.select_topk < 1:
            k = stats.extra["keep"]
            stats.masks[0] = stats.order[0].mask(n - k, n) if k else RankMask.nothing()

    def _weights(self, sums: list[Sum]) -> torch.Tensor:
        """mergekit's sce_weight from the sums of squares (torch's mean of half types: an
        fp32 sum divided by N in fp32, then rounded)."""
        import torch

        d = dtype_of(self.compute)
        acc = torch.float64 if d == torch.float64 else torch.float32
        means = torch.stack([s.rounded(acc) for s in sums]) / math.prod(self.shape)
        weights = means.to(d)
        total = torch.sum(weights).item()
        if abs(total) < 1e-6:
            return torch.ones_like(weights) / weights.shape[0]
        return weights / total

    def _start(self) -> Stats:
        from lazymerge.meaning.methods.select import OrderStats

        stats = Stats()
        if 0 < self.select_topk < 1:
            stats.order[0] = OrderStats(dtype_of("F32" if self.compute == "F64" else self.compute))
            stats.counts["nonzero"] = 0
        return stats


def build(call: Resolved) -> Sce:
    """SCE's call for one tensor: `select_topk` and `int8_mask` (shared); no weights."""
    return Sce(
        tensor=call.tensor,
        shape=call.shape,
        compute=call.compute,
        inputs=len(call.per_input) - 1,
        select_topk=float(call.shared["select_topk"]),
        int8_mask=bool(call.shared["int8_mask"]),
    )
