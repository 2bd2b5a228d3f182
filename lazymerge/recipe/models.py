"""Native N-model recipes (DESIGN §7): a method over a base and a list of models, each
with its LoRAs and parameters.

    method: ties
    base: ./base
    models:
      - model: ./math-ft
        loras: [{path: ./lora, weight: 0.25}]
        parameters: {weight: 0.5, density: [0.9, 0.3]}
    parameters: {normalize: true}
    seed: 42
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lazymerge.errors import RecipeError
from lazymerge.recipe.methods import METHOD_PARAMS, MethodParams
from lazymerge.recipe.params import Level, parse_parameters
from lazymerge.recipe.spec import MergeInput, MethodSpec, ModelSpec

KEYS = {"method", "base", "models", "parameters", "seed", "compute", "output", "layers_prefix"}
# `compute`: the dtype the arithmetic runs in, as a mergekit config's `dtype` (inputs
# rounded to it, every step rounded in it); "inputs": their promoted dtype. Unset: float32
# with one rounding. (A mergekit config's manifest records its precision so.)
COMPUTE = {
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "inputs": "inputs",
}


def method_of(name: object, where: str) -> MethodParams:
    """The method a recipe names, or one line listing those there are."""
    info = METHOD_PARAMS.get(name) if isinstance(name, str) else None
    if info is None:
        raise RecipeError(
            f"{where}: unknown method {name!r}; use one of {', '.join(METHOD_PARAMS)}"
        )
    return info


def parse_seed(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecipeError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def parse_method(
    d: dict[str, Any], base: ModelSpec, models: list[ModelSpec], source: str
) -> MethodSpec:
    """The `method`, `models`' parameters, `parameters` and `seed` of a native recipe;
    `models` are the entries' models, already parsed (with their LoRAs)."""
    method = method_of(d.get("method", "linear"), f"{source}: method")
    inputs = merge_inputs(d["models"], models, base, method, source)
    return MethodSpec(
        method.name,
        tuple(inputs),
        parse_parameters(d.get("parameters"), f"{source}: parameters", method, "method"),
        base_at=next((i for i, m in enumerate(models) if m == base), None),
        seed=parse_seed(d.get("seed", 0), f"{source}: seed"),
        compute=_compute(d.get("compute"), f"{source}: compute"),
    )


def _compute(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in COMPUTE:
        raise RecipeError(f"{where}: {value!r}; use one of {', '.join(COMPUTE)}")
    return COMPUTE[value]


def merge_inputs(
    entries: list[Any], models: list[ModelSpec], base: ModelSpec, method: MethodParams, source: str
) -> list[MergeInput]:
    """Each entry's model (parsed already) with its parameters, checked as a whole."""
    inputs = []
    for i, (entry, model) in enumerate(zip(entries, models, strict=True)):
        where = f"{source}: models[{i}].parameters"
        raw = entry.get("parameters") if isinstance(entry, dict) else None
        inputs.append(MergeInput(model, parse_parameters(raw, where, method, _level(model, base))))
    check_inputs(method, inputs, base, source)
    return inputs


def _level(model: ModelSpec, base: ModelSpec) -> Level:
    return "base" if model == base else "model"


def check_inputs(
    method: MethodParams, inputs: list[MergeInput], base: ModelSpec, source: str
) -> None:
    """The models a method merges (how many, the base included — an unlisted base is one
    more — and besides it: recipe/methods.py's Inputs), each listed once."""
    seen: set[Path] = set()
    for i, m in enumerate(inputs):
        if m.model.path in seen and m.model != base:
            raise RecipeError(f"{source}: models[{i}]: {m.model.path} is listed twice")
        seen.add(m.model.path)
    others = sum(m.model != base for m in inputs)
    problem = method.inputs.problem(method.name, others + 1, others)
    if problem is not None:
        raise RecipeError(f"{source}: models: {problem}")
