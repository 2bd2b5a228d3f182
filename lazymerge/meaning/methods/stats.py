"""The statistics of the task-arithmetic family and SCE, pass by pass: order statistics
of magnitudes (select.py), rank masks, 1-D DELLA's gathered magnitudes, exact sums
(exact.py). One `Stats` is every pass's accumulator and the writing pass's statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lazymerge.meaning.methods.base import Block
    from lazymerge.meaning.methods.exact import Sum
    from lazymerge.meaning.methods.select import OrderStats, RankMask


@dataclass
class Stats:
    """A tensor's statistics, each pass's Accumulator (with that pass's feed and finish).

    `feed(block, into)` adds a block to `into`: these Stats or, with `split`, a lane's
    `part()` (base.Splittable), whose order statistics, sums and counts are its own, and
    whose masks and probabilities are these (read only, or ordered: select.RankMask).
    """

    feed: Callable[[Block, Stats], None] = lambda block, into: None
    finish: Callable[[], None] = lambda: None
    split: bool = False
    order: dict[int, OrderStats] = field(default_factory=dict)
    masks: dict[int, RankMask] = field(default_factory=dict)
    gathered: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # 1-D DELLA, whole
    sums: dict[int, tuple[Sum, ...]] = field(default_factory=dict)  # Σ|δ|, Σ|δ'|
    factors: dict[int, torch.Tensor | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # a method's own (sce)
    counts: dict[str, int] = field(default_factory=dict)  # summed over the blocks (sce)

    def update(self, block: Block) -> None:
        self.feed(block, self)

    def result(self) -> Stats:
        self.finish()
        return self

    def part(self) -> Stats | None:
        if not self.split:
            return None
        return Stats(
            self.feed,
            split=True,
            order={i: o.part() for i, o in self.order.items() if not o.complete},
            masks=self.masks,
            probs=self.probs,
            sums={i: tuple(s.part() for s in pair) for i, pair in self.sums.items()},
            counts=dict.fromkeys(self.counts, 0),
        )

    def merge(self, part: Stats) -> None:
        """Adds a part's histograms, sums and counts: integers and exact sums."""
        for i, order in part.order.items():
            self.order[i].merge(order)
        for i, pair in part.sums.items():
            for mine, theirs in zip(self.sums[i], pair, strict=True):
                mine.merge(theirs)
        for key, n in part.counts.items():
            self.counts[key] += n

    def abandon(self) -> None:
        """A pass stopped short: no block waits on a mask's tie counts (Method.abandon)."""
        for mask in self.masks.values():
            mask.abandon()
