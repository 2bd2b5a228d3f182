"""Merge methods, one module each behind base.Method; METHODS finds one by its name."""

from lazymerge.meaning.methods.base import Accumulator, Block, Method
from lazymerge.meaning.methods.linear import Linear

METHODS: dict[str, type[Method]] = {m.name: m for m in (Linear,)}

__all__ = ["METHODS", "Accumulator", "Block", "Linear", "Method"]
