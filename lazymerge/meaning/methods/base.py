"""The one interface every merge method implements.

A method turns one block of rows of its inputs (each a model's tensor with that model's
adapters applied, in float32) into the block's output rows. The executor streams the
blocks; the method never reads a file, chooses a block size or a device. An instance
carries one tensor's parameters, and is frozen, so a plan holding it stays a value.

A method that needs whole-tensor statistics (norms, dot products, top-k thresholds)
says how many statistics passes it takes (`stat_passes`); for each, the executor streams
every block, in row order, through the accumulator `stats_pass` gives, and hands its
`result()` to the next pass, and the last one to `combine` for every block of the writing
pass. `combine` of such a method too sees the blocks exactly once each, in row order,
so a result may carry counters (ties at a top-k threshold are kept by flat index). A
method without statistics passes must keep no state between blocks: its blocks are
computed by several lanes at once (run/device.py `Lanes`), in any order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

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

    def rows(self, i: int, n: int | None = None) -> torch.Tensor:
        """The first `n` rows (default: all the input has) of input `i`'s block, in float32
        with its adapters applied: a scratch buffer the method may change in place, valid
        until the next block."""
        ...


class Accumulator(Protocol):
    """Whole-tensor statistics gathered block by block in a first pass."""

    def update(self, block: Block) -> None: ...
    def result(self) -> Any: ...


class Method(ABC):
    """How one output tensor's rows are made from its inputs' rows."""

    name: ClassVar[str]

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
