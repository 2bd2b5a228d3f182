"""How each method a recipe can name computes one tensor: its builder, from the
tensor's resolved parameters (base.Resolved) to a Method. The parameters themselves
(names, scopes, defaults) are declared in recipe/methods.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lazymerge.meaning.methods import sce, task
from lazymerge.meaning.methods.base import Method, Resolved, Scalar
from lazymerge.meaning.methods.linear import build_weighted
from lazymerge.recipe.methods import METHOD_PARAMS

Builder = Callable[[Resolved], Method]
# Plan-time checks of one input's values (name, shared, that input's): ValueError naming
# the parameter, before anything is read.
Check = Callable[[str, Mapping[str, Scalar], Mapping[str, Scalar]], None]


def _no_check(name: str, shared: Mapping[str, Scalar], per_input: Mapping[str, Scalar]) -> None:
    return None


BUILDERS: dict[str, Builder] = {
    "linear": build_weighted,
    "sce": sce.build,
    **{name: task.builder(name) for name in METHOD_PARAMS if name not in ("linear", "sce")},
}

CHECKS: dict[str, Check] = {
    "linear": _no_check,
    "sce": sce.check,
    **{name: task.check for name in BUILDERS if name not in ("linear", "sce")},
}
