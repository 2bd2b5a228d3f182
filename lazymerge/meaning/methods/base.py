"""The one interface every merge method implements.

A method turns one block of rows of its inputs (each a model's tensor with that model's
adapters applied, in float32) into the block's output rows. The executor streams the
blocks; the method never reads a file, chooses a block size or a device. An instance
carries one tensor's parameters, and is frozen, so a plan holding it stays a value.

A method that needs whole-tensor statistics (norms, dot products, top-k thresholds)
returns an accumulator from `first_pass`: the executor streams every block through it
first, then hands its `result()` to `combine` for each block of the second pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    def first_pass(self) -> Accumulator | None:
        """An accumulator when `combine` needs whole-tensor statistics; None (the default)
        when every block stands alone."""
        return None

    @abstractmethod
    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        """The block's output rows in float32 (a buffer from `block.rows` may be returned);
        `stats` is the first pass's result, if it had one."""

    def describe(self) -> str:
        """The method and its parameters, for people (plan, card)."""
        return self.name
