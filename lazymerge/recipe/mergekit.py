"""mergekit configurations, accepted as they are (DESIGN §7, docs/methods.md).

A YAML with `merge_method` is a mergekit config: `base_model`, `models` (each a path, a
Hub id, or `model+lora`) or `slices` of them (recipe/slices.py), `parameters`, `dtype`
(the *compute* dtype: inputs cast to it, arithmetic in it), `out_dtype` (the file's),
`random_seed`, `tokenizer_source` or a `tokenizer:` block and `chat_template`
(recipe/tokenizer.py), or a modular architecture's `modules` (recipe/modules.py). What
mergekit would silently ignore (an unknown key or parameter) is refused here in one line.

Paths resolve against the config's directory, then (as mergekit does) the working
directory; anything else is a Hub id, found in the local Hugging Face cache (read/hub.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lazymerge.errors import RecipeError
from lazymerge.read.hub import resolve
from lazymerge.recipe.methods import MethodParams
from lazymerge.recipe.models import (
    COMPUTE,
    base_index,
    merge_inputs,
    method_of,
    parse_seed,
    require_base,
)
from lazymerge.recipe.modules import Reader, donor, module_models, parse_modules
from lazymerge.recipe.params import parse_parameters
from lazymerge.recipe.slices import Syntax, parse_slices, slice_models
from lazymerge.recipe.spec import (
    LoraSpec,
    MergeInput,
    MethodSpec,
    ModelSpec,
    ModuleSpec,
    OutputSpec,
    Recipe,
    SliceSpec,
)
from lazymerge.recipe.tokenizer import chat_template, mergekit_tokenizer

KEYS = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "random_seed", "tokenizer_source", "slices", "modules", "tokenizer", "chat_template",
}  # fmt: skip
# The three ways a config lists what it merges: exactly one of them (mergekit's rule).
LISTS = ("models", "slices", "modules")
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})
# mergekit's dtype names (common.py dtype_from_name), with an optional "torch." prefix:
# the native `compute` names bar "inputs" (recipe/models.py).
DTYPES = {name: code for name, code in COMPUTE.items() if name != "inputs"}


def parse_mergekit(data: dict[str, Any], root: Path, source: str) -> Recipe:
    """A mergekit config -> a Recipe whose merge has mergekit's precision."""
    _refuse(data, source)
    method = method_of(data["merge_method"], f"{source}: merge_method")
    given = data.get("base_model")
    base = model_reference(given, root, f"{source}: base_model") if given is not None else None
    inputs, slices, modules, donor = _listed(data, root, method, base, source)
    merge = MethodSpec(
        method.name,
        inputs,
        parse_parameters(data.get("parameters"), f"{source}: parameters", method, "method"),
        base_at=base_index([m.model for m in inputs], base),
        seed=parse_seed(data.get("random_seed", 0), f"{source}: random_seed"),
        compute=_dtype(data.get("dtype"), f"{source}: dtype") or "inputs",
        source="mergekit",
        slices=slices,
        modules=modules,
        has_base=base is not None,
    )
    out = _dtype(data.get("out_dtype"), f"{source}: out_dtype")
    recipe = Recipe(donor, output=OutputSpec(dtype=out), merge=merge)
    return replace(
        recipe,
        tokenizer=mergekit_tokenizer(data, recipe.models(), _source_model(root), source),
        chat_template=chat_template(data.get("chat_template"), f"{source}: chat_template"),
    )


Listed = tuple[tuple[MergeInput, ...], tuple[SliceSpec, ...], tuple[ModuleSpec, ...], ModelSpec]


def _listed(
    data: dict[str, Any], root: Path, method: MethodParams, base: ModelSpec | None, source: str
) -> Listed:
    """What the config merges -- its `models`, `slices` or `modules`, exactly one of
    them -- as (every model, slices, modules, the config's donor)."""
    given = [key for key in LISTS if data.get(key) is not None]
    if len(given) > 1:
        raise RecipeError(
            f"{source}: give {given[0]} or {given[1]}, not both (as mergekit wants: one of "
            "models, slices, modules)"
        )
    syntax = Syntax(_source_model(root), "layer_range", "base_model", SOURCE_KEYS)
    if given == ["slices"]:
        slices = parse_slices(data["slices"], syntax, method, base, source)
        return slice_models(slices), slices, (), base or slices[0].sources[0].model
    if given == ["modules"]:
        entry = functools.partial(_entry_model, root=root)
        modules = parse_modules(data["modules"], Reader(syntax, entry, method, base), source)
        return module_models(modules), (), modules, base or donor(modules)
    require_base(method, base, f"{source}: base_model")
    models = _models(data.get("models"), root, source)
    base = next((m for m in models if m == base), base)
    inputs = tuple(merge_inputs(data["models"], models, base, method, source))
    return inputs, (), (), base or models[0]


def _models(entries: object, root: Path, source: str) -> list[ModelSpec]:
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{source}: models: expected a list of {{model, parameters}}")
    return [_entry_model(e, f"{source}: models[{i}]", root) for i, e in enumerate(entries)]


def _source_model(root: Path) -> Callable[[Any, str], ModelSpec]:
    def model(value: Any, where: str) -> ModelSpec:
        ref = value.get("model") if isinstance(value, dict) else value
        return model_reference(ref, root, f"{where}.model" if isinstance(value, dict) else where)

    return model


def _refuse(data: dict[str, Any], source: str) -> None:
    """Keys mergekit does not know: one line."""
    unknown = sorted(str(k) for k in data if k not in KEYS)
    if unknown:
        raise RecipeError(
            f"{source}: {unknown[0]}: not a mergekit config key; it knows {sorted(KEYS)}"
        )


def _entry_model(entry: object, where: str, root: Path) -> ModelSpec:
    if isinstance(entry, str):  # mergekit wants {model: ...}; a bare reference is clear enough
        return model_reference(entry, root, where)
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(f"{where}: expected {{model: ..., parameters: ...}}")
    unknown = sorted(str(k) for k in entry if k not in ("model", "parameters"))
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {unknown[0]!r}; a model entry has model, parameters"
        )
    return model_reference(entry["model"], root, f"{where}.model")


def model_reference(value: object, root: Path, where: str) -> ModelSpec:
    """`model` or `model+lora` (mergekit's syntax: the LoRA at full strength), each a path
    or a Hub id with an optional `@revision`."""
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a model path or Hub id, got {value!r}")
    model, plus, lora = value.partition("+")
    if plus and not lora:
        raise RecipeError(f"{where}: {value!r} ends with '+': name the LoRA after it")
    loras = (LoraSpec(_locate(lora, root, f"{where} (LoRA)")),) if lora else ()
    return ModelSpec(_locate(model, root, where), loras)


def _locate(ref: str, root: Path, where: str) -> Path:
    for candidate in (root / Path(ref).expanduser(), Path(ref).expanduser()):
        if candidate.exists():
            return candidate.resolve()
    return resolve(ref, where)


def _dtype(value: object, where: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in DTYPES:
        raise RecipeError(
            f"{where}: {value!r} is not a dtype mergekit knows; use {', '.join(DTYPES)}"
        )
    return DTYPES[name]
