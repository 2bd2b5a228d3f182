"""The one interface every merge method implements.

A method turns one block of rows of its inputs (each a model's tensor with that model's
adapters applied, in float32) into the block's output rows. The executor streams the
blocks; the method never reads a file, chooses a block size or a device. An instance
carries one tensor's parameters, and is frozen, so a plan holding it stays a value.

A method that needs whole-tensor statistics (norms, dot products, top-k thresholds)
says how many statistics passes it takes (`stat_passes`); for each, the executor streams
every block through the accumulator `stats_pass` gives, and hands its `result()` to the
next pass, and the last one to `combine` for every block of the writing pass. Each block
is seen once per pass. By default they come one at a time, in row order, so an
accumulator or a result may carry counters.

Lanes (run/device.py `Lanes`: several threads at once) take what says it can:
- a method without statistics passes keeps no state between blocks: its blocks are
  computed by several lanes at once, in any order;
- one with them, whose `blocks_at_once` is True: its `combine` reads the statistics only,
  or orders what it carries itself (select.RankMask: a block waits for the tie counts of
  the blocks before it), so lanes compute its blocks, handed out in row order;
- a pass whose accumulator is `Splittable`: each lane feeds its own `part()`, merged back
  exactly (integer counts, exact sums), so the result is one stream's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # methods only touch tensors they are given: no torch at import
    import torch


class Block(Protocol):
    """Rows [start, stop) of one output tensor, its inputs' rows loaded on demand."""

    @property
    def start(self) -> int: ...
    @property
    def stop(self) -> int: ...
    @property
    def shared(self) -> int:
        """Leading rows of the block every input has; past them only input 0 (the base)
        has rows (a smaller vocabulary in another model)."""
        ...

    def rows(self, i: int, n: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first `n` rows (default: all the input has) of input `i`'s block, in float32
        with its adapters applied: a scratch buffer the method may change in place, valid
        until the next block. With `dtype`, those values converted to it (as
        `.to(dtype)` would), read straight into it where no adapter applies."""
        ...


class Accumulator(Protocol):
    """Whole-tensor statistics gathered block by block in a first pass."""

    def update(self, block: Block) -> None: ...
    def result(self) -> Any: ...


@runtime_checkable
class Splittable(Protocol):
    """An accumulator whose pass several lanes may share, each feeding its own part."""

    def part(self) -> Accumulator | None:
        """An empty accumulator of this pass for a share of its blocks (in row order
        within the share), or None where this pass must see every block itself."""
        ...

    def merge(self, part: Any) -> None:
        """Adds what a `part()` gathered: exactly, so that the result is the same for any
        split of the blocks among parts and any order of merging them."""
        ...


@runtime_checkable
class Keeps(Protocol):
    """An accumulator that may keep, for the writing pass, what its method declares in
    `Method.held_bytes` (stats.Stats: DARE's drawn masks) where the executor grants it
    `room` (run/budget.kept_bytes: those bytes, or 0 where they do not fit)."""

    room: int


class Method(ABC):
    """How one output tensor's rows are made from its inputs' rows."""

    name: ClassVar[str]
    # Whether, given the statistics, `combine` may run on several blocks at once, from
    # several threads (blocks handed out in row order, each once). A method without
    # statistics passes always may; one whose combine counts across blocks in row order
    # says False and runs on one lane.
    blocks_at_once: ClassVar[bool] = False

    def stat_passes(self) -> int:
        """Streaming passes over the tensor before the one that writes it (0: every block
        stands alone)."""
        return 0

    def stats_pass(self, k: int, prior: Any) -> Accumulator:
        """The accumulator of statistics pass `k` (0-based), given the result of pass
        `k - 1` (None for the first)."""
        raise NotImplementedError(f"{self.name} takes no statistics pass")

    @abstractmethod
    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        """The block's output rows in float32 (a buffer from `block.rows` may be returned);
        `stats` is the first pass's result, if it had one."""

    def held_bytes(self) -> int:
        """Bytes the statistics passes keep for the writing pass beyond the statistics
        themselves (the budget counts them): none by default."""
        return 0

    def abandon(self, stats: Any) -> None:
        """A pass over the blocks stopped short (a failure in one lane): let nothing that
        `stats` (a pass's accumulator or the last result) orders wait for blocks that will
        not come; what is computed after is thrown away. By default, `stats.abandon()`
        where it has one (task.py's and sce.py's rank masks)."""
        let_go = getattr(stats, "abandon", None)
        if callable(let_go):
            let_go()

    def describe(self) -> str:
        """The method and its parameters, for people (plan, card)."""
        return self.name


Scalar = float | bool


@dataclass(frozen=True)
class Resolved:
    """One output tensor's call of a method: its parameters resolved for that tensor (by
    filter and layer position, DESIGN §7) and what the arithmetic depends on.

    Inputs are the plan's: index 0 is the base (the model task vectors are taken against),
    then the other models in the recipe's order. `order` is the order the recipe (a
    mergekit config) lists all inputs in, the base wherever it stands, for the methods
    whose rounding depends on it (`linear` sums in it).
    """

    tensor: str  # the output tensor's name
    shape: tuple[int, ...]
    compute: str  # dtype code the arithmetic runs in: F32 for native recipes, a mergekit
    # config's `dtype` (or its inputs' promoted dtype) for mergekit's bytes
    seed: int  # keys the random masks (DARE, DELLA) with the tensor's name
    shared: Mapping[str, Scalar]  # method-wide parameters, defaults filled in
    per_input: tuple[Mapping[str, Scalar], ...]  # per input; the base's holds only the
    # parameters every input takes (linear's weight)
    order: tuple[int, ...]
    has_base: bool = True  # False: the recipe names no base and input 0 is simply its first
    # model (nuslerp and multislerp then merge the models themselves, not task vectors)
