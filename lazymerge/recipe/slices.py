"""Slices: layer surgery (mergekit's `slices:`, DESIGN §7, docs/methods.md "Slices").

The output's decoder layers are the slices' layers in order; a slice's i-th layer is the
method over the i-th layer of each source's range, so an output may have more layers
than its inputs (a frankenmerge stacks ranges of several models, passthrough) or fewer.
The same reading serves the native syntax (`layers`, `base`) and mergekit's
(`layer_range`, `base_model`); what only the checkpoints can tell (a range past a
model's last layer) is checked when the merge is planned (plan/slices.py).

    slices:
      - sources: [{model: ./a, layers: [0, 24]}]
      - sources: [{model: ./b, layers: [8, 32]}]
    method: passthrough
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lazymerge.errors import RecipeError
from lazymerge.recipe.methods import MethodParams
from lazymerge.recipe.params import Level, parse_parameters
from lazymerge.recipe.spec import MergeInput, ModelSpec, SliceSource, SliceSpec

ModelReader = Callable[[Any, str], ModelSpec]  # (a source entry, where) -> its model


@dataclass(frozen=True)
class Syntax:
    """How one recipe syntax spells a slice: its keys and how it reads a model."""

    model: ModelReader
    range_key: str  # "layers" (native), "layer_range" (mergekit)
    base_key: str  # "base" (native), "base_model" (mergekit)
    source_keys: frozenset[str]


def parse_span(value: object, where: str) -> tuple[int, int]:
    """[start, end) of decoder layers: two integers, or "start:end"."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", value):
        value = [int(x) for x in value.split(":")]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        raise RecipeError(f"{where}: expected [start, end], two layer numbers, got {value!r}")
    start, end = value
    if start < 0 or end <= start:
        raise RecipeError(
            f"{where}: [{start}, {end}] is not a span; need 0 <= start < end (end exclusive)"
        )
    return start, end


def parse_slices(
    value: object, syntax: Syntax, method: MethodParams, base: ModelSpec | None, source: str
) -> tuple[SliceSpec, ...]:
    """`slices`, each checked as a whole: sources equally long, each model once, as many
    as the method merges, the base among them where the method takes task vectors."""
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{source}: slices: expected a list of {{sources: [...]}}")
    return tuple(
        _slice(s, syntax, method, base, f"{source}: slices[{i}]") for i, s in enumerate(value)
    )


def _slice(
    value: object, syntax: Syntax, method: MethodParams, base: ModelSpec | None, where: str
) -> SliceSpec:
    keys = {"sources", syntax.base_key, "parameters"}
    if not isinstance(value, dict) or not isinstance(value.get("sources"), list):
        raise RecipeError(f"{where}: expected {{sources: [{{model, {syntax.range_key}}}, ...]}}")
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; a slice has {sorted(keys)}")
    own = value.get(syntax.base_key)
    base = syntax.model(own, f"{where}.{syntax.base_key}") if own is not None else base
    sources = tuple(
        _source(s, syntax, method, base, f"{where}.sources[{j}]")
        for j, s in enumerate(value["sources"])
    )
    spec = SliceSpec(
        sources,
        base if own is not None else None,
        parse_parameters(value.get("parameters"), f"{where}.parameters", method, "method"),
    )
    _check(spec, method, base, syntax, where)
    return spec


def _source(
    value: object, syntax: Syntax, method: MethodParams, base: ModelSpec | None, where: str
) -> SliceSource:
    if not isinstance(value, dict) or "model" not in value:
        raise RecipeError(f"{where}: expected {{model: ..., {syntax.range_key}: [start, end]}}")
    unknown = sorted(str(k) for k in value if k not in syntax.source_keys)
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {unknown[0]!r}; a source has {sorted(syntax.source_keys)}"
        )
    if syntax.range_key not in value:
        raise RecipeError(f"{where}: {syntax.range_key} is required ([start, end) of its layers)")
    model = syntax.model(value, where)
    layers = parse_span(value[syntax.range_key], f"{where}.{syntax.range_key}")
    level: Level = "base" if model == base else "model"
    params = parse_parameters(value.get("parameters"), f"{where}.parameters", method, level)
    return SliceSource(model, layers, params)


def _check(
    spec: SliceSpec, method: MethodParams, base: ModelSpec | None, syntax: Syntax, where: str
) -> None:
    """What mergekit refuses of a slice (validate_ids, plan_slice), in one line each."""
    first = spec.sources[0] if spec.sources else None
    seen: list[ModelSpec] = []
    for j, src in enumerate(spec.sources):
        at = f"{where}.sources[{j}]"
        if first is not None and src.length != first.length:
            raise RecipeError(
                f"{at}.{syntax.range_key}: {src.length} layers, but sources[0] gives "
                f"{first.length}; every source of a slice gives it the same number of layers"
            )
        if src.model in seen:
            raise RecipeError(
                f"{at}: {src.model.path} is already a source of this slice; a slice merges "
                "each model once (use another slice for another range of it)"
            )
        seen.append(src.model)
    takes_base = method.needs_base or method.base_optional
    has_base = takes_base and base is not None and base in seen
    if takes_base and base is not None and not has_base:
        raise RecipeError(
            f"{where}.sources: the base {base.path} is not among them; {method.name} takes "
            "it as an input: add it as a source with the same range, or give the slice its "
            f"own {syntax.base_key}"
        )
    if method.needs_base and not method.base_optional and base is None:
        raise RecipeError(
            f"{where}: {method.name} needs a base model among the sources; name it "
            f"({syntax.base_key}: at the top or in the slice)"
        )
    others = len(seen) - int(has_base)
    problem = method.inputs.problem(method.name, len(seen), others)
    if problem is not None:
        fix = "; give each source a slice of its own" if method.inputs.most == 1 < len(seen) else ""
        raise RecipeError(f"{where}.sources: {problem.replace('this config', 'this slice')}{fix}")


def slice_models(slices: tuple[SliceSpec, ...]) -> tuple[MergeInput, ...]:
    """Every model the slices name, once, in order of first use (their parameters stay
    with the sources)."""
    models = dict.fromkeys(src.model for s in slices for src in s.sources)
    return tuple(MergeInput(m) for m in models)
