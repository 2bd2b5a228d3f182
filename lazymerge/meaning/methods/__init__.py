"""Merge methods, one module each behind base.Method: `linear` (the founding blend and
mergekit's N-model weighted sum), `task` (the task-arithmetic family: TIES, DARE,
breadcrumbs, DELLA), `sce`; `select` and `draws` are their exact top-k selection and
counter-based random masks. registry.BUILDERS finds a method by the name recipes use."""

from lazymerge.meaning.methods.base import Accumulator, Block, Method, Resolved, Splittable
from lazymerge.meaning.methods.linear import Linear

__all__ = ["Accumulator", "Block", "Linear", "Method", "Resolved", "Splittable"]
