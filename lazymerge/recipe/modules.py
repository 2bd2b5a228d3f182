"""`modules:`: a modular architecture merged module by module (mergekit's modular
architectures, docs/methods.md "Modules"): each module of the model (a vision-language
model's text decoder, vision tower, projector) by its own `slices` or `models`, with
its own `parameters`; one method, base and dtype for all of them.

    merge_method: linear
    modules:
      text_decoder:
        slices: [{sources: [{model: ./a, layer_range: [0, 2]}, {model: ./b, layer_range: [1, 3]}]}]
      vision_tower:
        parameters: {weight: 0.5}
        models: [{model: ./a}, {model: ./b}]
      multi_modal_projector:
        models: [{model: ./b}]

The same reading serves both syntaxes (the native one spells a source's range `layers`).
Module names are checked when the merge is planned (they depend on the checkpoint's
architecture: meaning/modules.py), and so are layer ranges. What mergekit silently
ignores in a module (a `merge_method`, `base_model` or `dtype` of its own) is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lazymerge.errors import RecipeError
from lazymerge.recipe.methods import MethodParams
from lazymerge.recipe.models import merge_inputs, method_of, method_spec, require_base
from lazymerge.recipe.params import parse_parameters
from lazymerge.recipe.slices import Syntax, parse_slices, slice_models
from lazymerge.recipe.spec import MergeInput, MethodSpec, ModelSpec, ModuleSpec

KEYS = ("models", "slices", "parameters")
EntryReader = Callable[[Any, str], ModelSpec]  # (a `models:` entry, where) -> its model


@dataclass(frozen=True)
class Reader:
    """How a recipe reads its modules: its syntax's slices and `models:` entries, and
    the method and base the whole recipe gives them."""

    syntax: Syntax
    entry: EntryReader
    method: MethodParams
    base: ModelSpec | None


def parse_modules(value: object, reader: Reader, source: str) -> tuple[ModuleSpec, ...]:
    """`modules`, a mapping of module names to {models | slices, parameters}, in order."""
    if not isinstance(value, dict) or not value:
        raise RecipeError(
            f"{source}: modules: expected a mapping of module names (text_decoder, "
            "vision_tower...) to {models: [...]} or {slices: [...]}"
        )
    return tuple(_module(str(name), body, reader, source) for name, body in value.items())


def _module(name: str, body: object, reader: Reader, source: str) -> ModuleSpec:
    where = f"{source}: modules.{name}"
    if not isinstance(body, dict):
        raise RecipeError(f"{where}: expected {{models: [...]}} or {{slices: [...]}}")
    unknown = sorted(str(k) for k in body if k not in KEYS)
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {unknown[0]!r}; a module has {', '.join(KEYS)} (the "
            "method, base model and dtype are the whole config's)"
        )
    if bool(body.get("models")) == bool(body.get("slices")):
        raise RecipeError(f"{where}: give it models or slices, one of the two (as mergekit wants)")
    method, base = reader.method, reader.base
    params = parse_parameters(body.get("parameters"), f"{where}.parameters", method, "method")
    if body.get("slices"):
        slices = parse_slices(body["slices"], reader.syntax, method, base, where)
        return ModuleSpec(name, slices=slices, parameters=params)
    entries = body["models"]
    if not isinstance(entries, list):
        raise RecipeError(f"{where}.models: expected a list of {{model, parameters}}")
    require_base(method, base, f"{source}: {reader.syntax.base_key}")
    models = [reader.entry(e, f"{where}.models[{i}]") for i, e in enumerate(entries)]
    inputs = merge_inputs(entries, models, base, method, where)
    return ModuleSpec(name, models=tuple(inputs), parameters=params)


def module_models(modules: tuple[ModuleSpec, ...]) -> tuple[MergeInput, ...]:
    """Every model the modules name, once, in order of first use (their parameters stay
    with the modules)."""
    models = dict.fromkeys(
        m.model for mod in modules for m in (*slice_models(mod.slices), *mod.models)
    )
    return tuple(MergeInput(m) for m in models)


def donor(modules: tuple[ModuleSpec, ...]) -> ModelSpec:
    """The model a config without a base takes its config.json from: the first module's
    first model (mergekit takes an arbitrary one: a set's first member)."""
    first = modules[0]
    return first.slices[0].sources[0].model if first.slices else first.models[0].model


def parse_modular(
    d: dict[str, Any], base: ModelSpec | None, syntax: Syntax, entry: EntryReader, source: str
) -> MethodSpec:
    """A native recipe's `modules` with its method and parameters."""
    method = method_of(d.get("method", "linear"), f"{source}: method")
    modules = parse_modules(d["modules"], Reader(syntax, entry, method, base), source)
    return method_spec(d, method, module_models(modules), base, source, modules=modules)
