"""The task-arithmetic family (docs/methods.md): `task_arithmetic`, `ties`, `dare_linear`,
`dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`, mergekit 0.1.5's
bytes: each task vector `δ_i = x_i - b` sparsified, weighted, optionally sign-voted and
summed, each step in the compute dtype d by mergekit's torch operations, in its order, on
the block's rows. Whole-tensor quantities come from statistics passes: the kept ranks of
|δ| (exact order statistics, select.py; ties by flat index where mergekit's argsort is
arbitrary), the L1 rescale's norms (`Sum`), a 1-D tensor's |δ| for DELLA's ranks. DARE's
and DELLA's masks are counter-based (draws.py): every pass sees the same mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.errors import NumericsError
from lazymerge.meaning.methods.base import Block, Method, Resolved, Scalar
from lazymerge.meaning.methods.exact import Sum
from lazymerge.meaning.methods.stats import Stats
from lazymerge.meaning.methods.vote import as_mask, sign_vote

if TYPE_CHECKING:
    import torch

    from lazymerge.meaning.methods.select import RankMask

# method -> (sparsifier, sign consensus): mergekit's merge_methods/registry.py
FAMILY: dict[str, tuple[str | None, bool]] = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
    "della": ("della_magprune", True),
    "della_linear": ("della_magprune", False),
}
KEEP, ZERO, RANKS, RANDOM, DELLA = "keep", "zero", "ranks", "random", "della"
# select.OrderStats' passes (float64 ranks as float32, as mergekit's CPU argsort does).
SELECT_PASSES = {"F16": 1, "BF16": 1, "F32": 2, "F64": 2}


@dataclass(frozen=True)
class Prune:
    """One input's sparsifier: kept, zeroed, ascending ranks [lo, hi) of |δ| kept, or kept
    at random: by `density` (DARE), by `density ± epsilon` and rank in the row (DELLA)."""

    kind: str
    lo: int = 0
    hi: int = 0


def prune(sparsifier: str | None, density: float, extra: float, numel: int) -> Prune:
    """mergekit's sparsify() decisions for one input, from Python numbers alone."""
    if sparsifier is None or density >= 1:
        return Prune(KEEP)
    if sparsifier == "magnitude":  # at least one kept, unless density <= 0
        keep = max(1, int(density * numel)) if density > 0 and numel else 0
        return Prune(RANKS, numel - keep, numel) if keep else Prune(ZERO)
    if sparsifier == "magnitude_outliers":  # extra: gamma
        target, top = int(density * numel), int(extra * numel)
        bottom = max(0, numel - target - top)
        return Prune(RANKS, bottom, min(bottom + max(target, 0), numel))
    if sparsifier == "random":
        return Prune(RANDOM)
    if density <= 0:  # della_magprune; extra: epsilon
        return Prune(ZERO)
    if density + extra >= 1 or density - extra <= 0:
        msg = f"density {density:g} with epsilon {extra:g}: density ± epsilon must lie inside"
        raise ValueError(f"{msg} (0, 1)")
    return Prune(DELLA)


def check(name: str, shared: Mapping[str, Scalar], per_input: Mapping[str, Scalar]) -> None:
    """Plan-time checks of one input's parameters: ValueError naming the parameter."""
    sparsifier, density = FAMILY[name][0], float(per_input.get("density", 1.0))
    if sparsifier is not None and not 0 < density <= 1:
        raise ValueError(f"{name}: density {density:g} is outside (0, 1]")
    if sparsifier == "magnitude_outliers" and not 0 <= float(per_input.get("gamma", 0)) < 1:
        raise ValueError(f"{name}: gamma {float(per_input['gamma']):g} is outside [0, 1)")
    try:  # della: density ± epsilon inside (0, 1)
        prune(sparsifier, density, float(per_input.get("epsilon", 0.15)), 1)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def dtype_of(code: str) -> torch.dtype:
    from lazymerge.read.mapped import DTYPES

    return DTYPES[code]


def work_dtype(d: torch.dtype) -> torch.dtype:
    """The random sparsifiers' dtype on the CPU: bf16, else fp32 (fp64 goes down too)."""
    import torch

    return d if d == torch.bfloat16 else torch.float32


@dataclass(frozen=True)
class TaskMerge(Method):
    """One tensor's call of the family (a subclass per method, below, names it)."""

    name = "task_arithmetic"
    # DARE's and DELLA's masks are drawn by flat index (draws.py); a top-k mask orders
    # its tie counts itself (select.RankMask): lanes compute the blocks.
    blocks_at_once = True
    tensor: str
    shape: tuple[int, ...]
    compute: str
    seed: int
    prunes: tuple[Prune, ...]  # per non-base input
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    extras: tuple[float, ...]  # gamma or epsilon, for describe()
    normalize: bool
    rescale: bool
    lam: float
    int8_mask: bool

    def stages(self) -> tuple[str, ...]:
        """The statistics passes: cuts of |δ|, 1-D DELLA's magnitudes, the L1 norms."""
        kinds = {p.kind for p in self.prunes}
        select = ("select",) * SELECT_PASSES[self.compute] * any(map(self._cuts, self.prunes))
        gather = ("gather",) * (DELLA in kinds and len(self.shape) == 1)
        return select + gather + ("norms",) * bool(self.rescale and kinds & {RANKS, RANDOM, DELLA})

    def stat_passes(self) -> int:
        return len(self.stages())

    def stats_pass(self, k: int, prior: Any) -> Stats:
        import torch

        stats = prior if isinstance(prior, Stats) else self._start()
        stage, last = self.stages()[k], k == self.stat_passes() - 1
        if stage == "norms":
            self._fresh_masks(stats)

        fed = {"select": [*stats.order], "gather": [*stats.gathered], "norms": [*stats.sums]}

        def feed(block: Block, into: Stats) -> None:
            b = block.rows(0, dtype=dtype_of(self.compute))
            for i in fed[stage]:
                delta = block.rows(i, dtype=b.dtype) - b
                if stage == "select":
                    into.order[i].update(self._rank_values(delta))
                elif stage == "gather":
                    into.gathered[i].append(delta.abs())
                else:
                    whole, masked = self._masked(i, delta, block, into, store=into.room > 0)
                    into.sums[i][0].add(whole.abs())
                    into.sums[i][1].add(masked.abs())

        def finish() -> None:
            if stage == "select":
                for o in stats.order.values():
                    o.next_pass()
            elif stage == "gather":
                for i, parts in stats.gathered.items():
                    rows = self._della_probs(i, torch.cat(parts).unsqueeze(0))
                    stats.probs[i] = rows.reshape(-1)
                stats.gathered.clear()
            elif stage == "norms":
                for i, (before, after) in stats.sums.items():
                    stats.factors[i] = self._factor(before, after, self.prunes[i - 1])
            if last:
                self._fresh_masks(stats)

        stats.feed, stats.finish, stats.split = feed, finish, stage != "gather"  # in order
        return stats

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        import torch

        state = stats if isinstance(stats, Stats) else self._fresh_masks(self._start())  # no pass
        d = dtype_of(self.compute)
        b = block.rows(0, dtype=d)
        if not self.prunes:
            return b
        deltas = b.new_empty((len(self.prunes), *b.shape))
        # In place where mergekit makes a new tensor: the same operations on the same
        # values, so the same bits, with fewer passes over memory.
        for i, p in enumerate(self.prunes, start=1):  # mergekit's sparsify(), input by input
            delta = torch.sub(block.rows(i, dtype=d), b, out=deltas[i - 1])
            if p.kind == ZERO:
                delta.zero_()
            elif p.kind != KEEP:
                _, masked = self._masked(i, delta, block, state)
                factor = state.factors.get(i)
                masked = masked if factor is None else masked * factor.to(masked.device)
                delta.copy_(masked)
        weights = torch.tensor(self.weights, dtype=d, device=b.device).view(-1, *[1] * b.dim())
        deltas.mul_(weights)
        if FAMILY[self.name][1]:  # the sign vote (int8_mask: the same mask, the same bits)
            mixed, divisor = sign_vote(deltas, weights)  # divisor: zeros set to 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if self.normalize:
            mixed /= divisor
        if self.lam != 1:
            mixed *= self.lam
        return (b + mixed).to(d)

    def describe(self) -> str:
        """E.g. `ties w=0.5/0.3 d=0.5/0.7 normalize`."""
        parts = [self.name, "w=" + "/".join(f"{x:g}" for x in self.weights)]
        if FAMILY[self.name][0] is not None:
            parts.append("d=" + "/".join(f"{x:g}" for x in self.densities))
            if self.extras:
                key = "g" if "breadcrumbs" in self.name else "e"
                parts.append(f"{key}=" + "/".join(f"{x:g}" for x in self.extras))
            parts += ["rescale"] * self.rescale
        parts += ["normalize"] * self.normalize + [f"lambda={self.lam:g}"] * (self.lam != 1)
        return " ".join(parts)

    def _masked(
        self, i: int, delta: torch.Tensor, block: Block, stats: Stats, store: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor the rescale measures, it masked), in the sparsifier's work dtype.
        A drawn mask is kept in `stats` with `store` (the norms pass), and taken back from
        there rather than drawn again (the writing pass)."""
        import torch

        from lazymerge.meaning.methods import draws

        p = self.prunes[i - 1]
        start = block.start * math.prod(self.shape[1:])  # the block's first flat index
        if p.kind == RANKS:  # magnitude, magnitude_outliers: δ·mask in d
            return delta, self._ranked(stats.masks[i], delta, start)
        w = work_dtype(delta.dtype)
        whole = delta.to(w)
        mask = stats.keeps.take(i, start, tuple(whole.shape))
        if mask is None:
            key = draws.stream_key(self.seed, self.tensor, i)
            if p.kind == RANDOM:
                prob: float | torch.Tensor = float(torch.full((), self.densities[i - 1], dtype=w))
            elif len(self.shape) == 1:
                prob = stats.probs[i][block.start : block.stop]
            else:
                prob = self._della_probs(i, delta.abs())
            mask = draws.keep_mask(key, start, tuple(whole.shape), prob, whole.device)
            if store:
                stats.keeps.put(i, start, mask, math.prod(self.shape))
        return whole, whole * as_mask(mask, w)

    def held_bytes(self) -> int:
        """The norms pass's drawn masks (DARE, DELLA with the rescale), a bit per element
        of each input drawn for: kept for the writing pass where the executor gives them
        room (Stats.room: budget.kept_bytes), so drawn once (drawing was ~36 % of a
        DARE-TIES merge, twice)."""
        if "norms" not in self.stages():
            return 0
        drawn = sum(p.kind in (RANDOM, DELLA) for p in self.prunes)
        return -(-math.prod(self.shape) // 8) * drawn

    def _rank_values(self, delta: torch.Tensor) -> torch.Tensor:
        """|δ| as mergekit ranks it on the CPU: d's values, float64 ones as float32."""
        mags = delta.abs()
        return mags.float() if mags.element_size() == 8 else mags

    @staticmethod
    def _ranked(mask: RankMask, delta: torch.Tensor, start: int) -> torch.Tensor:
        """δ·mask in d, the mask from |δ| as mergekit ranks it on the CPU (d's values,
        float64 ones as float32), all in float32 where d is narrower: fp16/bf16 values
        widen exactly, and a product by 1.0 or +0.0 is exact in either (-0.0 for a
        negative δ, as in d), so it rounds back to mergekit's bits."""
        import torch

        wide = delta.float()  # float64: rounded, as mergekit ranks it
        keep = mask.weights(wide.abs(), start)
        if delta.dtype == torch.float64:
            return delta * keep.to(delta.dtype)
        return (wide * keep if wide is delta else wide.mul_(keep)).to(delta.dtype)

    def _della_probs(self, i: int, mags: torch.Tensor) -> torch.Tensor:
        """DELLA's keep probabilities: |δ| ranked along dim 1, stably, in w (bf16 rounds)."""
        import torch

        w = work_dtype(mags.dtype)
        ranks = torch.argsort(mags, dim=1, stable=True).argsort(dim=1).to(w) + 1
        # mergekit's min and max over each row: the ranks 0 and n - 1, so converted.
        lo, hi = (torch.tensor([0, mags.shape[1] - 1], device=mags.device).to(w) + 1).unbind()
        norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        density, epsilon = self.densities[i - 1], self.extras[i - 1]
        return (density - epsilon) + norm * 2 * epsilon

    def _factor(self, before: Sum, after: Sum, p: Prune) -> torch.Tensor | None:
        """⟦A/A'⟧_w, or None where mergekit keeps δ' unscaled."""
        import torch

        w = dtype_of(self.compute) if p.kind == RANKS else work_dtype(dtype_of(self.compute))
        a, a2 = before.rounded(w), after.rounded(w)
        if not (bool(torch.isfinite(a)) and bool(torch.isfinite(a2))):
            norm = float(before.rounded(torch.float64))
            raise NumericsError(
                f"{self.tensor}: the L1 norm of a task vector ({norm:.6g}) overflows {w} in the "
                "rescale (mergekit would write NaN); use dtype: float32 or rescale: false"
            )
        if bool(a < 1e-7) or bool(a2 < 1e-7):  # mergekit's eps: no norm to match
            return None
        return a / a2

    def _cuts(self, p: Prune) -> bool:  # a range of ranks neither empty nor everything
        return p.kind == RANKS and p.lo < p.hi and (p.lo > 0 or p.hi < math.prod(self.shape))

    def _start(self) -> Stats:
        from lazymerge.meaning.methods.select import OrderStats, range_ranks

        stats = Stats()
        rank_dtype = dtype_of("F32" if self.compute == "F64" else self.compute)
        for i, p in enumerate(self.prunes, start=1):
            if self._cuts(p):
                stats.order[i] = OrderStats(
                    rank_dtype, range_ranks(p.lo, p.hi, math.prod(self.shape))
                )
            if p.kind == DELLA and len(self.shape) == 1:
                stats.gathered[i] = []
            if self.rescale and p.kind in (RANKS, RANDOM, DELLA):
                stats.sums[i] = (Sum(), Sum())
        return stats

    def _fresh_masks(self, stats: Stats) -> Stats:
        """New rank masks (they count ties as blocks pass) for the next pass over the blocks."""
        from lazymerge.meaning.methods.select import RankMask

        for i, p in enumerate(self.prunes, start=1):
            if i in stats.order:
                stats.masks[i] = stats.order[i].mask(p.lo, p.hi)
            elif p.kind == RANKS:
                stats.masks[i] = RankMask.nothing() if p.lo >= p.hi else RankMask(None, None)
        return stats


for _method in FAMILY:  # a class per method, for its name; bound here so instances pickle
    _name = _method.title().replace("_", "")  # Ties, DareLinear...
    globals()[_name] = type(_name, (TaskMerge,), {"name": _method, "__module__": __name__})
CLASSES: dict[str, type[TaskMerge]] = {c.name: c for c in TaskMerge.__subclasses__()}


def build(name: str, call: Resolved) -> TaskMerge:
    """`name`'s call for one tensor; ValueError for DELLA's density ± epsilon out of (0, 1)."""
    sparsifier, _ = FAMILY[name]
    others = call.per_input[1:]
    key = {"magnitude_outliers": "gamma", "della_magprune": "epsilon"}.get(sparsifier or "")
    extras = tuple(float(p[key]) for p in others) if key else ()
    numel = math.prod(call.shape)
    prunes = []
    for j, p in enumerate(others):
        try:
            prunes.append(prune(sparsifier, float(p["density"]), extras[j] if key else 0.0, numel))
        except ValueError as e:
            raise ValueError(f"{name}: {call.tensor}: input {j + 1}: {e}") from None
    if DELLA in {q.kind for q in prunes} and (call.shape[1:2] or call.shape) == (1,):
        raise ValueError(
            f"{name}: {call.tensor} {list(call.shape)} has one element to rank per row: "
            "DELLA's keep probabilities are 0/0 (mergekit fails on it too)"
        )
    return CLASSES[name](
        tensor=call.tensor,
        shape=call.shape,
        compute=call.compute,
        seed=call.seed,
        prunes=tuple(prunes),
        weights=tuple(float(p["weight"]) for p in others),
        densities=tuple(float(p["density"]) for p in others),
        extras=extras,
        normalize=bool(call.shared["normalize"]),
        rescale=bool(call.shared["rescale"]),
        lam=float(call.shared["lambda"]),
        int8_mask=bool(call.shared["int8_mask"]),
    )


def builder(name: str) -> Callable[[Resolved], Method]:
    """The builder of one of the family's methods (registry.py); KeyError for another."""
    if name not in FAMILY:
        raise KeyError(f"{name} is not a task-arithmetic method")
    return functools.partial(build, name)
