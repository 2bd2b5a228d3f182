"""A method parameter's value for one tensor (DESIGN §7; mergekit's `evaluate_setting`
and `resolve_parameter`, docs/methods.md "Parameters and gradients").

Levels are searched in order (a model's own parameters, then the method-wide ones); in
each, the first conditional whose filter is in the tensor's name decides; none matching
falls through to the next level, and the method's default ends the search. A value of
several anchors is a gradient over the layer position `t` in [0, 1]: numbers
interpolate linearly (in float64, as mergekit does), a bool steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lazymerge.meaning.layers import LayerStack
from lazymerge.recipe.methods import Param
from lazymerge.recipe.spec import Parameters, Scalar, Value


@dataclass(frozen=True)
class Level:
    """One place parameters are written, named for errors ("models[1]", "parameters")."""

    where: str
    parameters: Parameters


def position(name: str, stack: LayerStack) -> float:
    """The layer position `t` of a tensor: layer i of L is i/(L-1) (1 when L is 1), and a
    tensor outside the decoder layers takes 0, the first anchor (mergekit's rule)."""
    layer = stack.layer_of(name)
    if layer is None:
        return 0.0
    return layer / (stack.count - 1) if stack.count > 1 else 1.0


def at(value: Value, t: float) -> Scalar:
    """A value at position t: a constant, or its anchors interpolated (a bool steps)."""
    if len(value) == 1:
        return value[0]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    if any(isinstance(v, bool) for v in value):
        return value[i0]
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(value[i0]) + frac * float(value[i1])


@dataclass(frozen=True)
class Found:
    """A resolved value and where it came from (level and conditional index; None: the
    method's default)."""

    value: Scalar | None
    where: str | None = None
    conditional: int | None = None


def resolve(param: Param, levels: Sequence[Level], name: str, t: float) -> Found:
    """`param`'s value for tensor `name` at position t (value None: required, unset)."""
    for level in levels:
        setting = level.parameters.get(param.name)
        for k, cond in enumerate(setting or ()):
            if cond.filter is None or cond.filter in name:
                value = at(cond.value, t)
                return Found(float(value) if param.kind is float else bool(value), level.where, k)
    return Found(param.default)


def varies(param: Param, levels: Sequence[Level], name: str) -> bool:
    """Whether the setting that decides `param` for tensor `name` is a gradient whose
    anchors differ (its value then depends on the tensor's position t)."""
    found = resolve(param, levels, name, 0.0)
    level = next((lv for lv in levels if lv.where == found.where), None)
    if level is None or found.conditional is None:
        return False  # the method's default: a constant
    return len(set(level.parameters[param.name][found.conditional].value)) > 1
