"""Exact order statistics of a tensor streamed in blocks, and the mask of a range of ranks.

TIES keeps the k largest |δ|, breadcrumbs the ranks [B, B+T) of |δ|, SCE the k largest
variances. mergekit sorts the whole tensor; lazymerge sees it one block of rows at a time
and must still keep exactly as many elements as mergekit does. A sort per block cannot
do that, and a sample or a sketch only comes close.

A non-negative float's bit pattern read as an integer orders like its value (IEEE 754
puts the exponent above the significand, and subnormals, 0 and inf fit in), so choosing
by value is choosing by integer, and a histogram of the patterns (`torch.bincount`) finds
the value at any rank without a sort. float16 and bfloat16 have 2^15 non-negative
patterns: one histogram, one pass. float32 takes two passes: the high 16 bits first, then
the low 16 bits of only the elements whose high half holds a wanted rank. Memory is a few
2^15/2^16-bin histograms whatever the tensor's size; a block costs a few vectorised ops.

Ties are ranked by flat (row-major) index, lower index first. mergekit's unstable argsort
orders them arbitrarily (docs/methods.md, hazard 1); a rule that depends on nothing but
the tensor keeps masks independent of block size, device and thread count. A `RankMask`
counts the ties at its bounds as blocks pass, each block once: in flat order, or from
several threads at once given each block's flat start, each block waiting for the tie
counts of those before it (started earlier) until the cut's first kept tie is behind.

The histograms are integer counts, so a pass may be shared: each thread streams some of
the blocks into its own `part()`, and `merge` adds the parts back, giving the counts (and
the cuts) of one stream of every block, whatever the split and the order.

Values must be non-negative: a negative one raises ValueError, a NaN NumericsError (it has
no rank). Each block is read as `values + 0.0`, which turns -0.0 into 0.0 (so it ties with
0.0, as in comparisons) and quiets a signalling NaN, whose high half then lies above inf's
where the first histogram sees it.

Example (TIES: the k largest of n magnitudes):
    stats = OrderStats(torch.float16, range_ranks(n - k, n, n))
    for _ in range(stats.passes):
        for block in blocks():
            stats.update(block.abs())
        stats.next_pass()
    keep = stats.mask(n - k, n)
    kept = [block * keep(block.abs()) for block in blocks()]
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lazymerge.errors import NumericsError
from lazymerge.meaning.methods.exact import wide

# The integer type whose values are the float's bit patterns.
_PATTERN = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
# The first high-16-bit pattern that is a NaN: just above inf's.
_FIRST_NAN = {torch.float16: 0x7C01, torch.bfloat16: 0x7F81, torch.float32: 0x7F81}
_HIGH_BINS = 1 << 15  # non-negative 16-bit patterns, or high halves of float32 ones
_LOW_BINS = 1 << 16  # low halves of float32 patterns


@dataclass(frozen=True)
class Cut:
    """One ascending order statistic of a whole stream of values."""

    rank: int  # 0-based ascending rank
    value: float  # the value at that rank (exact: representable in the stream's dtype)
    below: int  # how many elements are < value
    equal: int  # how many elements are == value; ranks below .. below + equal - 1


def range_ranks(lo: int, hi: int, n: int) -> tuple[int, ...]:
    """The ranks `OrderStats` must find for `mask(lo, hi)` over `n` elements: lo unless the
    range starts at the smallest, hi unless it ends at the largest; none when it is empty."""
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return ()
    return tuple(r for r, inner in ((lo, lo > 0), (hi, hi < n)) if inner)


class OrderStats:
    """The exact ascending order statistics `ranks` (0-based) of the values streamed
    through it, in `passes` passes over the same blocks in the same order.

    The ranks are given to the constructor, or to the first `next_pass` when they depend on
    what the first pass counted (SCE: a share of the nonzero variances); `count` is the
    number of elements the first pass has seen so far.
    """

    def __init__(self, dtype: torch.dtype, ranks: Sequence[int] = ()) -> None:
        if dtype not in _PATTERN:
            raise ValueError(f"OrderStats: {dtype} is not float16, bfloat16 or float32")
        self.dtype = dtype
        self.passes = 1 if _PATTERN[dtype] == torch.int16 else 2
        self.count = 0  # elements in the first pass: every pass must see as many
        self._ranks = tuple(ranks)
        self._done = 0  # passes complete
        self._seen = 0  # elements in the current pass, after the first
        self._device = torch.device("cpu")  # where the first pass's blocks were
        self._high: torch.Tensor | None = None  # histogram of patterns or high halves
        self._low: dict[int, torch.Tensor] = {}  # float32: high half -> low halves' histogram

    def update(self, values: torch.Tensor) -> None:
        """One block of the current pass (any shape; blocks in the same order every pass)."""
        if values.dtype != self.dtype:
            raise ValueError(f"OrderStats: a {values.dtype} block in a {self.dtype} stream")
        if self._done >= self.passes:
            raise ValueError(f"OrderStats: all {self.passes} passes are complete")
        bits = (values.reshape(-1) + 0.0).view(_PATTERN[self.dtype])  # + 0.0: -0.0 -> 0.0
        high = bits if self.passes == 1 else bits >> 16  # arithmetic: a negative stays < 0
        if self._done == 0:
            self.count += bits.numel()
            self._device = values.device
            part = _histogram(high, _HIGH_BINS)
            self._high = part if self._high is None else self._high.add_(part)
        else:
            self._seen += bits.numel()
        for bucket, hist in self._low.items():
            hist += torch.bincount(bits[high == bucket] & 0xFFFF, minlength=_LOW_BINS)

    def part(self) -> OrderStats:
        """An empty OrderStats in this one's pass, for a share of its blocks (`merge`)."""
        part = OrderStats(self.dtype, self._ranks)
        part._done, part._device = self._done, self._device
        part._low = {bucket: torch.zeros_like(hist) for bucket, hist in self._low.items()}
        return part

    def merge(self, part: OrderStats) -> None:
        """Adds the counts of a `part()` fed some of this pass's blocks: integers, so the
        same as had this one seen them, in any order."""
        if part._done != self._done:
            raise ValueError("OrderStats: a part of another pass")
        if self._done == 0:
            self.count += part.count
            if part._high is not None:
                self._device = part._device
                self._high = part._high if self._high is None else self._high.add_(part._high)
        else:
            self._seen += part._seen
        for bucket, hist in part._low.items():
            self._low[bucket] += hist

    def next_pass(self, ranks: Sequence[int] | None = None) -> None:
        """The current pass is complete; `ranks`, after the first pass only, replace the
        constructor's."""
        if self._done == 0:
            self._close_first(self._ranks if ranks is None else tuple(ranks))
        elif ranks is not None:
            raise ValueError("OrderStats: ranks are fixed at the end of the first pass")
        elif self._seen != self.count:
            raise ValueError(
                f"OrderStats: pass {self._done + 1} saw {self._seen} elements, the first "
                f"{self.count}; every pass must stream the same blocks"
            )
        self._done += 1
        self._seen = 0

    def cuts(self) -> tuple[Cut, ...]:
        """One `Cut` per rank, in the order the ranks were given; after `passes` passes."""
        self._check_complete()
        return tuple(self._cut(r) for r in self._ranks)

    def mask(self, lo: int, hi: int) -> RankMask:
        """A fresh `RankMask` (one per pass over the blocks) keeping ranks [lo, hi),
        clipped to [0, count); the ranks `range_ranks(lo, hi, count)` must be among those
        found."""
        self._check_complete()  # before it, `count` is not known
        lo, hi = max(lo, 0), min(hi, self.count)
        if lo >= hi:
            return RankMask.nothing()
        cuts = {c.rank: c for c in self.cuts()}
        missing = set(range_ranks(lo, hi, self.count)) - set(cuts)
        if missing:
            raise ValueError(f"OrderStats: rank(s) {sorted(missing)} were not asked for")
        return RankMask(cuts.get(lo), cuts.get(hi))

    @property
    def complete(self) -> bool:
        """Whether every pass is done (the cuts and masks are known)."""
        return self._done >= self.passes

    def _check_complete(self) -> None:
        if self._done < self.passes:
            raise ValueError(f"OrderStats: {self._done} of {self.passes} passes complete")

    def _close_first(self, ranks: tuple[int, ...]) -> None:
        """Fixes the ranks, checks the first histogram; float32: which buckets to refine."""
        wrong = [r for r in ranks if not 0 <= r < self.count]
        if wrong:
            raise ValueError(f"OrderStats: rank(s) {wrong} outside 0 .. {self.count - 1}")
        self._ranks = ranks
        high = self._high if self._high is not None else torch.zeros(_HIGH_BINS)
        self._high = high.to(torch.int64).cpu()
        if int(self._high[_FIRST_NAN[self.dtype] :].sum()):
            raise NumericsError("OrderStats: NaN among the values; a NaN has no rank")
        if self.passes == 2:
            zeros = torch.zeros(_LOW_BINS, dtype=torch.int64, device=self._device)
            self._low = {_bucket(self._high, r)[0]: zeros.clone() for r in ranks}

    def _cut(self, rank: int) -> Cut:
        assert self._high is not None  # set by the first pass
        bucket, below = _bucket(self._high, rank)
        pattern, equal = bucket, int(self._high[bucket])
        if self.passes == 2:
            low = self._low[bucket].cpu()
            part, under = _bucket(low, rank - below)
            pattern, below, equal = bucket << 16 | part, below + under, int(low[part])
        value = torch.tensor([pattern], dtype=_PATTERN[self.dtype]).view(self.dtype)
        return Cut(rank, float(value.item()), below, equal)


def _histogram(keys: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each key in 0 .. bins - 1 (no more: a NaN's pattern is below 2^15)."""
    try:
        return torch.bincount(keys, minlength=bins)
    except RuntimeError as err:  # bincount refuses a negative key: a negative value
        raise ValueError("OrderStats: negative values (or -NaN); it ranks magnitudes") from err


def _count_ones(ones: torch.Tensor) -> int:
    """How many 1.0s a 0/1 float block holds: an fp32 sum, exact below 2^24 elements and
    16x faster than count_nonzero; count_nonzero above."""
    if ones.dtype == torch.float32 and ones.numel() < 2**24:
        return int(ones.sum())
    return int(ones.count_nonzero())


def _bucket(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding ascending rank `rank`, and how many elements lie in lower bins."""
    ends = hist.cumsum(0)
    b = int(torch.searchsorted(ends, torch.tensor([rank]), right=True)[0])
    return b, int(ends[b]) - int(hist[b])


class _AtLeast:
    """`rank >= cut.rank`, block by block: the values above the cut's, and its ties from
    the (rank - below)-th on (0-based, in flat order).

    A block's ties are kept by how many lie before it. Blocks come in flat order, or at
    once from several threads, each with its flat `start`: a block then waits for the one
    before it to have counted its ties (it started earlier), until the cut's first kept
    tie is behind, from where every tie is kept and nothing waits.
    """

    def __init__(self, cut: Cut) -> None:
        self.value = cut.value
        self.ties_before = cut.rank - cut.below  # ties ranked below the cut
        self._at = 0  # flat index the ties are counted up to
        self._seen = 0  # ties before it
        self._open = self.ties_before == 0  # every tie from _at on is kept (or abandoned)
        self._turn = threading.Condition()

    def __call__(self, flat: torch.Tensor, start: int | None) -> torch.Tensor:
        """1.0 where `flat`'s rank is at least the cut's, +0.0 elsewhere, written over
        `flat` (a float32/float64 block the caller gives up): float compares into floats,
        ~2x faster on the CPU than compares into bool and bool into numbers."""
        if self._open:
            return flat.ge_(self.value)
        ties = torch.eq(flat, self.value, out=torch.empty_like(flat))  # 1.0 / 0.0
        n = _count_ones(ties)
        seen = self._count(start, flat.numel(), n)
        out = flat.gt_(self.value)  # disjoint from the ties: a sum stays 1 or 0
        if seen >= self.ties_before:
            out.add_(ties)
        elif seen + n > self.ties_before:  # the first kept tie is in here
            first = int(ties.nonzero()[self.ties_before - seen, 0])
            out[first:].add_(ties[first:])
        return out

    def _count(self, start: int | None, numel: int, ties: int) -> int:
        """Ties before the block at `start` (None: the next in flat order), once the
        blocks before it have counted theirs; records its own."""
        with self._turn:
            at = self._at if start is None else start
            if at < self._at:
                raise ValueError(f"RankMask: the block at {at} again (counted to {self._at})")
            self._turn.wait_for(lambda: self._open or self._at == at)
            if self._open:
                return self.ties_before
            seen = self._seen
            self._at, self._seen = at + numel, seen + ties
            self._open = self._seen >= self.ties_before
            self._turn.notify_all()
            return seen

    def abandon(self) -> None:
        """The pass stopped short: nothing waits for blocks that will not come (what is
        computed after is thrown away)."""
        with self._turn:
            self._open = True
            self._turn.notify_all()


class RankMask:
    """Keeps the elements whose ascending rank is in [lo.rank, hi.rank), ties ranked by
    flat index, block by block: blocks in flat order, each exactly once. `lo` None keeps
    from the smallest, `hi` None up to the largest; lo.rank >= hi.rank keeps nothing."""

    def __init__(self, lo: Cut | None, hi: Cut | None) -> None:
        self._lo = None if lo is None else _AtLeast(lo)
        self._hi = None if hi is None else _AtLeast(hi)
        self._empty = lo is not None and hi is not None and lo.rank >= hi.rank

    @classmethod
    def nothing(cls) -> RankMask:
        """A mask that keeps no element: an empty range needs no cuts."""
        mask = cls(None, None)
        mask._empty = True
        return mask

    def __call__(self, values: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """A block's mask, True where an element is kept, in `values`' shape: the block
        whose first element has flat index `start` (None: the block after the last one)."""
        copy = values.to(wide(values.dtype), memory_format=torch.contiguous_format, copy=True)
        return self.weights(copy, start).bool()

    def weights(self, values: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """The same mask as 1.0 (kept) and +0.0, written over `values`, a contiguous
        float32 or float64 block the caller gives up (float16/bfloat16 magnitudes widen to
        float32 exactly, so they rank alike)."""
        if self._empty:
            return values.zero_()
        flat = values.view(-1)  # contiguous: the results are written over it
        if self._lo is None and self._hi is None:
            return values.fill_(1)
        if self._lo is None:
            assert self._hi is not None
            return self._hi(flat, start).neg_().add_(1).view(values.shape)  # 1 - above hi
        keep = self._lo(flat.clone() if self._hi is not None else flat, start)
        if self._hi is not None:  # ranks at or above hi are at or above lo: 1 - 1 = +0
            keep.sub_(self._hi(flat, start))
        return keep.view(values.shape)

    def abandon(self) -> None:
        """The pass over the blocks stopped short (a failure in another thread): no block
        waits for the ties of one that will not come."""
        for bound in (self._lo, self._hi):
            if bound is not None:
                bound.abandon()
