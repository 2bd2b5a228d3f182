"""The merge methods a recipe can name, and the parameters each declares: name, type,
scope, default — mergekit 0.1.5's (docs/methods.md). Pure data: the parser refuses
what this table does not declare, the planner resolves what it does per tensor, and
meaning/methods/registry.py says how each method computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lazymerge.recipe.spec import Scalar


class Scope(StrEnum):
    """Where a parameter's value lives."""

    SHARED = "shared"  # one value per tensor, method-wide (a model's value is refused)
    INPUT = "input"  # one per input, the base included (linear's weight)
    NON_BASE = "non-base"  # one per input other than the base


@dataclass(frozen=True)
class Param:
    name: str
    kind: type[float] | type[bool]
    scope: Scope
    default: Scalar | None = None  # None: required


@dataclass(frozen=True)
class Inputs:
    """How many inputs a method merges (mergekit's InputContract): all of them, the base
    included (an unlisted base_model is one more), and those besides the base."""

    least: int = 1
    most: int | None = None
    models_least: int = 1  # besides the base
    models_most: int | None = None

    def problem(self, method: str, inputs: int, models: int) -> str | None:
        """Why `inputs` inputs, `models` of them besides the base, are wrong, or None."""
        for n, lo, hi, what in (
            (inputs, self.least, self.most, "the base included"),
            (models, self.models_least, self.models_most, "besides the base"),
        ):
            if n < lo or (hi is not None and n > hi):
                bound = lo if n < lo else hi
                how = "exactly" if lo == hi else "at least" if n < lo else "at most"
                models_ = "model" if bound == 1 else "models"
                return f"{method} merges {how} {bound} {models_}, {what}; this config has {n}"
        return None


@dataclass(frozen=True)
class MethodParams:
    name: str
    params: tuple[Param, ...]
    needs_base: bool  # task vectors are taken against the base, which must be given
    inputs: Inputs = Inputs()
    # mergekit's base is optional: with one the method merges task vectors, without one the
    # models themselves (Resolved.has_base says which).
    base_optional: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _task(normalize: bool, rescale: bool, *extra: Param) -> tuple[Param, ...]:
    """The task-arithmetic family's parameters (mergekit's GeneralizedTaskArithmeticMerge)."""
    return (
        Param("int8_mask", bool, Scope.SHARED, False),
        Param("normalize", bool, Scope.SHARED, normalize),
        Param("rescale", bool, Scope.SHARED, rescale),
        Param("lambda", float, Scope.SHARED, 1.0),
        Param("weight", float, Scope.NON_BASE),
        Param("density", float, Scope.NON_BASE, 1.0),
        *extra,
    )


_GAMMA = Param("gamma", float, Scope.NON_BASE, 0.01)
_EPSILON = Param("epsilon", float, Scope.NON_BASE, 0.15)
_LINEAR = (Param("weight", float, Scope.INPUT), Param("normalize", bool, Scope.SHARED, True))
_SCE = (
    Param("int8_mask", bool, Scope.SHARED, False),
    Param("select_topk", float, Scope.SHARED, 1.0),
)
_T = (Param("t", float, Scope.SHARED),)
_NUSLERP = (
    Param("weight", float, Scope.NON_BASE),
    Param("nuslerp_row_wise", bool, Scope.SHARED, False),
    Param("nuslerp_flatten", bool, Scope.SHARED, True),
)
_MULTISLERP = (
    Param("weight", float, Scope.NON_BASE),
    Param("normalize_weights", bool, Scope.SHARED, True),
    Param("eps", float, Scope.SHARED, 1e-8),
)
# mergekit's max_iter is an int: registry.py's check refuses a fractional value.
_KARCHER = (Param("max_iter", float, Scope.SHARED, 10.0), Param("tol", float, Scope.SHARED, 1e-5))
_STOCK = (Param("filter_wise", bool, Scope.SHARED, False),)
_SCALE = (Param("scale", float, Scope.INPUT, 1.0),)  # mergekit's None (no scale) is 1
_PAIR = Inputs(2, 2, 1, 1)  # the base and exactly one other model

METHOD_PARAMS: dict[str, MethodParams] = {
    m.name: m
    for m in (
        MethodParams("linear", _LINEAR, needs_base=False),
        MethodParams("task_arithmetic", _task(False, False), needs_base=True),
        MethodParams("ties", _task(True, False), needs_base=True),
        MethodParams("dare_linear", _task(False, True), needs_base=True),
        MethodParams("dare_ties", _task(False, True), needs_base=True),
        MethodParams("breadcrumbs", _task(False, False, _GAMMA), needs_base=True),
        MethodParams("breadcrumbs_ties", _task(False, False, _GAMMA), needs_base=True),
        MethodParams("della", _task(True, True, _EPSILON), needs_base=True),
        MethodParams("della_linear", _task(False, True, _EPSILON), needs_base=True),
        MethodParams("sce", _SCE, needs_base=True),
        MethodParams("slerp", _T, needs_base=True, inputs=_PAIR),
        MethodParams("nearswap", _T, needs_base=True, inputs=_PAIR),
        MethodParams("arcee_fusion", (), needs_base=True, inputs=_PAIR),
        MethodParams("model_stock", _STOCK, needs_base=True, inputs=Inputs(3, None, 2)),
        # nuslerp and multislerp take a base or not (base_optional); lazymerge asks for
        # one until the planner tells them which (Resolved.has_base).
        MethodParams(
            "nuslerp", _NUSLERP, needs_base=True, inputs=Inputs(2, None, 2, 2), base_optional=True
        ),
        MethodParams("multislerp", _MULTISLERP, needs_base=True, base_optional=True),
        # karcher averages every input, the base (if named) as one more
        MethodParams("karcher", _KARCHER, needs_base=False, inputs=Inputs(1, None, 0)),
        # passthrough: one model as it is
        MethodParams("passthrough", _SCALE, needs_base=False, inputs=Inputs(1, 1, 0)),
    )
}
