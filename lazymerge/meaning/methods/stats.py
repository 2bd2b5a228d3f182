"""The statistics of the task-arithmetic family and SCE, pass by pass: order statistics
of magnitudes (select.py), rank masks, 1-D DELLA's gathered magnitudes, exact sums
(exact.py). One `Stats` is every pass's accumulator and the writing pass's statistics.
"""

from __future__ import annotations

import math
import threading
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
    # a norms pass's drawn keep masks, a bit per element: the writing pass takes them back
    # rather than drawing them again (task.py); shared with the parts, as the masks are
    keeps: Kept = field(default_factory=lambda: Kept())
    room: int = 0  # bytes the executor grants a pass to keep for the next (budget.kept_bytes)

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
            keeps=self.keeps,
            room=self.room,
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


class Kept:
    """Drawn keep masks, a bit per element: one buffer per input for the whole tensor,
    where a chunk starts on a byte (every chunk of a matrix whose rows are whole bytes),
    else a small array per chunk. A buffer goes once its chunks are all taken back.
    Lanes put and take disjoint chunks at once."""

    def __init__(self) -> None:
        self._buffers: dict[int, Any] = {}  # input -> packed bits of the whole tensor
        self._left: dict[int, int] = {}  # input -> its chunks in the buffer not taken yet
        self._chunks: dict[tuple[int, int, int], Any] = {}  # (input, start, count) -> bits
        self._lock = threading.Lock()

    def put(self, i: int, start: int, mask: torch.Tensor, total: int) -> None:
        """Keep input `i`'s mask of the elements from flat index `start` of a tensor of
        `total` (a CPU one: a GPU's is drawn again)."""
        import numpy as np

        if mask.device.type != "cpu":
            return
        count = mask.numel()
        bits = np.packbits(mask.numpy().reshape(-1))
        if start % 8 or (count % 8 and start + count != total):
            self._chunks[(i, start, count)] = bits
            return
        with self._lock:
            if i not in self._buffers:
                self._buffers[i], self._left[i] = np.empty(-(-total // 8), np.uint8), 0
            buffer = self._buffers[i]
        buffer[start // 8 : start // 8 + len(bits)] = bits  # lanes write disjoint bytes
        with self._lock:  # there to take once written
            self._left[i] += 1
            self._chunks[(i, start, count)] = None  # in the buffer

    def take(self, i: int, start: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The mask `put` kept for these elements (given back once), or None."""
        import numpy as np
        import torch

        count = math.prod(shape)
        with self._lock:
            if (key := (i, start, count)) not in self._chunks:
                return None
            bits = self._chunks.pop(key)
            if bits is None:
                bits = self._buffers[i][start // 8 : start // 8 - (-count // 8)]
                self._left[i] -= 1
                if not self._left[i]:
                    del self._buffers[i], self._left[i]
        return torch.from_numpy(np.unpackbits(bits, count=count).view(np.bool_)).view(shape)
