"""How each method a recipe can name computes one tensor: its builder, from the
tensor's resolved parameters (base.Resolved) to a Method. The parameters themselves
(names, scopes, defaults) are declared in recipe/methods.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lazymerge.meaning.methods import fusion, karcher, multislerp, sce, slerp, stock, task
from lazymerge.meaning.methods.base import Method, Resolved, Scalar
from lazymerge.meaning.methods.linear import build_weighted
from lazymerge.meaning.methods.pointwise import build_nearswap, build_passthrough

Builder = Callable[[Resolved], Method]
# Plan-time checks of one input's values (name, shared, that input's): ValueError naming
# the parameter, before anything is read.
Check = Callable[[str, Mapping[str, Scalar], Mapping[str, Scalar]], None]


def _no_check(name: str, shared: Mapping[str, Scalar], per_input: Mapping[str, Scalar]) -> None:
    return None


BUILDERS: dict[str, Builder] = {
    "linear": build_weighted,
    "sce": sce.build,
    **{name: task.builder(name) for name in task.FAMILY},
    "slerp": slerp.build_slerp,
    "nuslerp": slerp.build_nuslerp,
    "multislerp": multislerp.build,
    "karcher": karcher.build,
    "model_stock": stock.build,
    "nearswap": build_nearswap,
    "arcee_fusion": fusion.build,
    "passthrough": build_passthrough,
}

CHECKS: dict[str, Check] = {
    **{name: _no_check for name in BUILDERS},
    "sce": sce.check,
    **{name: task.check for name in task.FAMILY},
    "karcher": karcher.check,
    "slerp": slerp.check,
}
