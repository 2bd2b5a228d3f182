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
from lazymerge.recipe.slices import Syntax, parse_slices, slice_models
from lazymerge.recipe.spec import MergeInput, MethodSpec, ModelSpec

KEYS = {
    "method", "base", "models", "slices", "modules", "parameters", "seed", "compute", "output",
    "layers_prefix", "tokenizer", "chat_template",
}  # fmt: skip
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
    d: dict[str, Any], base: ModelSpec | None, models: list[ModelSpec], source: str
) -> MethodSpec:
    """The `method`, `models`' parameters, `parameters` and `seed` of a native recipe;
    `models` are the entries' models, already parsed (with their LoRAs). Without a base,
    the first model stands in its place (methods that take no base)."""
    method = method_of(d.get("method", "linear"), f"{source}: method")
    require_base(method, base, f"{source}: base")
    inputs = merge_inputs(d["models"], models, base, method, source)
    return MethodSpec(
        method.name,
        tuple(inputs),
        parse_parameters(d.get("parameters"), f"{source}: parameters", method, "method"),
        base_at=base_index(models, base),
        seed=parse_seed(d.get("seed", 0), f"{source}: seed"),
        compute=_compute(d.get("compute"), f"{source}: compute"),
        has_base=base is not None,
    )


def parse_sliced(
    d: dict[str, Any], base: ModelSpec | None, syntax: Syntax, source: str
) -> MethodSpec:
    """A native recipe's `slices` (recipe/slices.py) with its method and parameters."""
    method = method_of(d.get("method", "linear"), f"{source}: method")
    slices = parse_slices(d["slices"], syntax, method, base, source)
    return method_spec(d, method, slice_models(slices), base, source, slices=slices)


def method_spec(
    d: dict[str, Any],
    method: MethodParams,
    inputs: tuple[MergeInput, ...],
    base: ModelSpec | None,
    source: str,
    **listed: Any,
) -> MethodSpec:
    """A native recipe's merge over `inputs` (every model its slices or modules name),
    with its `parameters`, `seed` and `compute`; `listed`: its slices or modules."""
    return MethodSpec(
        method.name,
        inputs,
        parse_parameters(d.get("parameters"), f"{source}: parameters", method, "method"),
        base_at=base_index([m.model for m in inputs], base),
        seed=parse_seed(d.get("seed", 0), f"{source}: seed"),
        compute=_compute(d.get("compute"), f"{source}: compute"),
        has_base=base is not None,
        **listed,
    )


def require_base(method: MethodParams, base: ModelSpec | None, where: str) -> None:
    """A method that takes task vectors against a base needs one named."""
    if base is None and method.needs_base and not method.base_optional:
        raise RecipeError(
            f"{where}: {method.name} needs a base model (task vectors are taken against it)"
        )


def base_index(models: list[ModelSpec], base: ModelSpec | None) -> int | None:
    """Where the base stands among the models (None: unlisted); no base: the first."""
    if base is None:
        return 0
    return next((i for i, m in enumerate(models) if m == base), None)


def _compute(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in COMPUTE:
        raise RecipeError(f"{where}: {value!r}; use one of {', '.join(COMPUTE)}")
    return COMPUTE[value]


def merge_inputs(
    entries: list[Any],
    models: list[ModelSpec],
    base: ModelSpec | None,
    method: MethodParams,
    source: str,
) -> list[MergeInput]:
    """Each entry's model (parsed already) with its parameters, checked as a whole."""
    inputs = []
    for i, (entry, model) in enumerate(zip(entries, models, strict=True)):
        where = f"{source}: models[{i}].parameters"
        raw = entry.get("parameters") if isinstance(entry, dict) else None
        level: Level = "base" if model == base else "model"
        inputs.append(MergeInput(model, parse_parameters(raw, where, method, level)))
    check_inputs(method, inputs, base, source)
    return inputs


def check_inputs(
    method: MethodParams, inputs: list[MergeInput], base: ModelSpec | None, source: str
) -> None:
    """The models a method merges (how many, the base included — an unlisted base is one
    more — and besides it: recipe/methods.py's Inputs), each listed once."""
    seen: set[Path] = set()
    for i, m in enumerate(inputs):
        if m.model.path in seen and m.model != base:
            raise RecipeError(f"{source}: models[{i}]: {m.model.path} is listed twice")
        seen.add(m.model.path)
    others = sum(m.model != base for m in inputs)
    problem = method.inputs.problem(method.name, others + (base is not None), others)
    if problem is not None:
        raise RecipeError(f"{source}: models: {problem}")
