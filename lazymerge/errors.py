"""One exception family: the CLI turns any of these into one line on stderr."""

from __future__ import annotations


class LazyMergeError(Exception):
    """Base of every error lazymerge reports to a user."""


class RecipeError(LazyMergeError):
    """The recipe (or the flags standing in for one) is wrong."""


class InputError(LazyMergeError):
    """A checkpoint or adapter is missing, malformed, or does not fit the recipe."""


class OutputError(LazyMergeError):
    """The output directory cannot be used or written."""


class NumericsError(LazyMergeError):
    """A merged tensor came out with NaN or Inf values."""


class MachineError(LazyMergeError):
    """This machine or cluster cannot do what was asked: no such GPU, no Ray or no Ray
    cluster at the address, another lazymerge version on a worker."""


class NoopError(LazyMergeError):
    """The recipe, as planned, would not do what it says: an adapter or a rule that changes
    nothing, or an output equal to the base (`--allow-noop` merges anyway)."""
