"""Method parameters as recipes write them -> Settings (spec.py), checked against what
the method declares (methods.py). The same syntax in native recipes and mergekit
configs: a scalar, a list of anchors over the layers, or a list of `{filter, value}`.

What mergekit silently ignores is refused here, naming the key: a parameter the method
does not take, a method-wide one given to a model, one the base does not take.
"""

from __future__ import annotations

import math
from typing import Literal

from lazymerge.errors import RecipeError
from lazymerge.recipe.methods import MethodParams, Param, Scope
from lazymerge.recipe.spec import Conditional, Parameters, Scalar, Setting, Value

Level = Literal["method", "model", "base"]  # where a `parameters:` mapping sits


def parse_parameters(value: object, where: str, method: MethodParams, level: Level) -> Parameters:
    """One `parameters:` mapping, every key a parameter `method` takes at this level."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping of parameter names to values")
    out: Parameters = {}
    for key, setting in value.items():
        param = method.param(str(key))
        if param is None:
            takes = ", ".join(p.name for p in method.params)
            raise RecipeError(
                f"{where}.{key}: {method.name} has no parameter {key!r}; it takes {takes}"
            )
        _check_level(param, level, f"{where}.{key}", method.name)
        out[param.name] = _setting(setting, f"{where}.{key}", param)
    return out


def _check_level(param: Param, level: Level, where: str, method: str) -> None:
    if level != "method" and param.scope == Scope.SHARED:
        raise RecipeError(
            f"{where}: {param.name} is method-wide in {method}; give it under the "
            "top-level parameters, not a model's"
        )
    if level == "base" and param.scope == Scope.NON_BASE:
        raise RecipeError(
            f"{where}: {method} takes no {param.name} for the base model (task vectors are "
            "taken against it)"
        )


def _setting(value: object, where: str, param: Param) -> Setting:
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        return tuple(_conditional(e, f"{where}[{i}]", param) for i, e in enumerate(value))
    if isinstance(value, dict):
        return (_conditional(value, where, param),)
    return (Conditional(None, _value(value, where, param)),)


def _conditional(value: dict[object, object], where: str, param: Param) -> Conditional:
    unknown = sorted(str(k) for k in value if k not in ("filter", "value"))
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {unknown[0]!r}; a filtered value has filter, value"
        )
    if "value" not in value:
        raise RecipeError(f"{where}: 'value' is required")
    filt = value.get("filter")
    if filt is not None and (not isinstance(filt, str) or not filt):
        raise RecipeError(f"{where}.filter: expected a tensor-name substring, got {filt!r}")
    return Conditional(
        None if filt in (None, "*") else str(filt), _value(value["value"], f"{where}.value", param)
    )


def _value(value: object, where: str, param: Param) -> Value:
    """A constant, or a gradient: anchors spread over the layers (a bool steps)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecipeError(f"{where}: an empty list of anchors")
    return tuple(
        _scalar(v, f"{where}[{i}]" if isinstance(value, list) else where, param)
        for i, v in enumerate(items)
    )


def _scalar(value: object, where: str, param: Param) -> Scalar:
    if param.kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {param.name} is true or false, got {value!r}")
        return value
    number = value
    if isinstance(value, str):  # mergekit validates leniently: "0.5" is a number there
        try:
            number = float(value)
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise RecipeError(f"{where}: {param.name} is a number, got {value!r}")
    return float(number)
