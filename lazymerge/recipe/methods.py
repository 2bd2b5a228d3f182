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
class MethodParams:
    name: str
    params: tuple[Param, ...]
    needs_base: bool  # task vectors are taken against the base, which must be given

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
    )
}
