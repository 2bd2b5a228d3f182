"""YAML recipe -> a frozen, validated Recipe (spec.py). Every bad key or value is named
in the error."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import yaml

from lazymerge.errors import RecipeError
from lazymerge.recipe import models
from lazymerge.recipe.modules import donor, parse_modular
from lazymerge.recipe.slices import Syntax, parse_span
from lazymerge.recipe.spec import (
    DTYPE_NAMES,
    GGUF_QUANTS,
    Format,
    GradientRule,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    Over,
    Recipe,
)
from lazymerge.recipe.tokenizer import chat_template, tokenizer_block

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; relative paths in it are resolved against its directory."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"{p}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise RecipeError(f"{p}: not valid YAML{at}") from None
    return parse_recipe(data, p.resolve().parent, str(p))


def parse_recipe(data: object, root: Path, source: str = "recipe") -> Recipe:
    """Validate recipe data (already parsed from YAML) into a Recipe: a mergekit config
    (it has `merge_method`), an N-model recipe (`models`), or the founding two-model one."""
    if isinstance(data, dict) and "merge_method" in data:
        from lazymerge.recipe.mergekit import parse_mergekit

        return parse_mergekit(data, root, source)
    if isinstance(data, dict) and any(k in data for k in ("models", "modules", "method")):
        return _n_models(data, root, source)
    d = _mapping(data, source, {"base", "other", "gradient", "output", "layers_prefix"})
    if "base" not in d:
        raise RecipeError(f"{source}: 'base' is required (a model path)")
    base = _model(d["base"], root, f"{source}: base")
    other = _model(d["other"], root, f"{source}: other") if d.get("other") is not None else None
    gradient = _gradient(d.get("gradient"), f"{source}: gradient")
    if other is None and gradient:
        raise RecipeError(f"{source}: 'gradient' needs an 'other' model to blend with")
    if other is not None and not gradient:
        raise RecipeError(f"{source}: 'other' is given but no 'gradient' says how to blend it")
    output = _output(d.get("output") or {}, f"{source}: output")
    return Recipe(base, other, gradient, output, _prefix(d.get("layers_prefix"), source))


def _n_models(data: dict[str, Any], root: Path, source: str) -> Recipe:
    """A native N-model recipe (recipe/models.py): `models`, `slices` of them, or a
    modular architecture's `modules` (recipe/modules.py)."""
    d = _mapping(data, source, models.KEYS)
    base = _model(d["base"], root, f"{source}: base") if d.get("base") is not None else None
    given = [key for key in ("models", "slices", "modules") if d.get(key) is not None]
    if len(given) > 1:
        raise RecipeError(f"{source}: give {given[0]} or {given[1]}, not both")
    if given == ["slices"]:
        merge = models.parse_sliced(d, base, _native_syntax(root), source)
        base = base or merge.slices[0].sources[0].model
    elif given == ["modules"]:
        if d.get("layers_prefix") is not None:
            raise RecipeError(
                f"{source}: layers_prefix: not with modules (each module's layers are its "
                "architecture's); leave it out"
            )
        entry = functools.partial(_entry, root=root)
        merge = parse_modular(d, base, _native_syntax(root), entry, source)
        base = base or donor(merge.modules)
    else:
        entries = d.get("models")
        if not isinstance(entries, list) or not entries:
            raise RecipeError(
                f"{source}: models: expected a list of models ({{model, loras, parameters}})"
            )
        specs = [_entry(e, f"{source}: models[{i}]", root) for i, e in enumerate(entries)]
        merge = models.parse_method(d, base, specs, source)
        base = base or specs[0]
    output = _output(d.get("output") or {}, f"{source}: output")
    recipe = Recipe(
        base, output=output, layers_prefix=_prefix(d.get("layers_prefix"), source), merge=merge
    )
    return _tokenizer(recipe, d, root, source)


def _tokenizer(recipe: Recipe, d: dict[str, Any], root: Path, source: str) -> Recipe:
    """A native recipe's `tokenizer: {source, tokens}` and `chat_template`."""
    block, template = d.get("tokenizer"), d.get("chat_template")
    spec = None
    if block is not None:
        locate = functools.partial(_model_at, root)
        spec = tokenizer_block(block, recipe.models(), locate, f"{source}: tokenizer")
    return replace(
        recipe, tokenizer=spec, chat_template=chat_template(template, f"{source}: chat_template")
    )


def _model_at(root: Path, value: Any, where: str) -> ModelSpec:
    return _model(value, root, where)


def _native_syntax(root: Path) -> Syntax:
    """The native spelling of a slice's source: {model, loras, layers, parameters}."""

    def model(value: Any, where: str) -> ModelSpec:
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in ("model", "loras")}
        return _model(value, root, where)

    keys = frozenset({"model", "loras", "layers", "parameters"})
    return Syntax(model, "layers", "base", keys)


def _entry(value: object, where: str, root: Path) -> ModelSpec:
    """One of `models`: a path, or {model, loras, parameters} (parameters parsed later)."""
    if isinstance(value, dict):
        _mapping(value, where, {"model", "loras", "parameters"})
        value = {k: v for k, v in value.items() if k != "parameters"}
    return _model(value, root, where)


def _prefix(prefix: object, source: str) -> str | None:
    if prefix is not None and (not isinstance(prefix, str) or not prefix.strip(".")):
        raise RecipeError(
            f"{source}: layers_prefix: expected the decoder layers' name prefix, e.g. "
            f"transformer.h, got {prefix!r}"
        )
    return prefix


def _mapping(value: object, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping with keys {sorted(allowed)}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}")
    return value


def _path(value: object, root: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a path, got {value!r}")
    p = (root / Path(value).expanduser()).resolve()
    if not p.exists():
        raise RecipeError(f"{where}: {p} does not exist")
    return p


def _model(value: object, root: Path, where: str) -> ModelSpec:
    if isinstance(value, str):
        return ModelSpec(_path(value, root, where))
    d = _mapping(value, where, {"model", "loras"})
    if "model" not in d:
        raise RecipeError(f"{where}: 'model' is required (a model path)")
    loras = d.get("loras") or []
    if not isinstance(loras, list):
        raise RecipeError(f"{where}.loras: expected a list of {{path, weight}}")
    return ModelSpec(
        _path(d["model"], root, f"{where}.model"),
        tuple(_lora(lo, root, f"{where}.loras[{i}]") for i, lo in enumerate(loras)),
    )


def _lora(value: object, root: Path, where: str) -> LoraSpec:
    if isinstance(value, str):
        return LoraSpec(_path(value, root, where))
    d = _mapping(value, where, {"path", "weight"})
    if "path" not in d:
        raise RecipeError(f"{where}: 'path' is required (an adapter directory)")
    weight = _number(d.get("weight", 1.0), f"{where}.weight")
    return LoraSpec(_path(d["path"], root, f"{where}.path"), weight)


def _number(value: object, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise RecipeError(f"{where}: {value} is outside [{lo}, {hi}]")
    return float(value)


def _gradient(value: object, where: str) -> tuple[GradientRule, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{where}: the list of rules is empty")
        return tuple(_rule(r, f"{where}[{i}]") for i, r in enumerate(value))
    return (_rule(value, where),)


def _rule(value: object, where: str) -> GradientRule:
    d = _mapping(value, where, {"values", "layers", "rest", "filter", "over"})
    over: Over = d.get("over", "layers")
    if over not in get_args(Over):
        raise RecipeError(f"{where}.over: {over!r}; use 'layers' or 'tensors'")
    if over == "tensors" and ("layers" in d or "rest" in d):
        key = "layers" if "layers" in d else "rest"
        raise RecipeError(
            f"{where}.{key}: not used with over: tensors (the anchors cover every tensor the rule decides)"
        )
    values = d.get("values")
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list) or not values:
        raise RecipeError(f"{where}.values: expected a list of ratios like [0.9, 0.0]")
    anchors = tuple(_number(v, f"{where}.values[{i}]", 0.0, 1.0) for i, v in enumerate(values))
    layers = parse_span(d["layers"], f"{where}.layers") if d.get("layers") is not None else None
    rest = _number(d.get("rest", 0.0), f"{where}.rest", 0.0, 1.0)
    filt = d.get("filter")
    if filt is not None and (not isinstance(filt, str) or not filt):
        raise RecipeError(f"{where}.filter: expected a non-empty string, got {filt!r}")
    return GradientRule(anchors, layers, rest, filt, over)


def _output(value: object, where: str) -> OutputSpec:
    d = _mapping(value, where, {"dtype", "shard_size", "format", "quant", "tokenizer"})
    dtype = parse_dtype(d["dtype"], f"{where}.dtype") if d.get("dtype") is not None else None
    size = d.get("shard_size")
    out = OutputSpec(dtype, parse_size(size, f"{where}.shard_size") if size is not None else None)
    tokenizer = d.get("tokenizer", True)
    if not isinstance(tokenizer, bool):
        raise RecipeError(f"{where}.tokenizer: expected true or false, got {tokenizer!r}")
    fmt = parse_format(d.get("format", "safetensors"), f"{where}.format")
    return check_output(replace(out, format=fmt, quant=d.get("quant"), tokenizer=tokenizer), where)


def parse_format(value: object, where: str) -> Format:
    if value not in ("safetensors", "gguf"):
        raise RecipeError(f"{where}: {value!r}; use safetensors or gguf")
    return "gguf" if value == "gguf" else "safetensors"


def check_output(out: OutputSpec, where: str) -> OutputSpec:
    """A GGUF needs a quant that exists; safetensors takes none."""
    if out.format != "gguf":
        if out.quant is not None or not out.tokenizer:
            raise RecipeError(f"{where}: quant and tokenizer are for format: gguf")
        return out
    if out.quant is None:
        raise RecipeError(f"{where}: format gguf needs a quant: one of {', '.join(GGUF_QUANTS)}")
    quant = str(out.quant).lower()
    if quant not in GGUF_QUANTS:
        raise RecipeError(
            f"{where}: quant {out.quant!r} does not exist; use one of {', '.join(GGUF_QUANTS)}"
        )
    return replace(out, quant=quant)


def parse_dtype(value: object, where: str = "dtype") -> str:
    """'float16' / 'bf16' / ... -> safetensors dtype code."""
    code = DTYPE_NAMES.get(str(value).lower()) if isinstance(value, str) else None
    if code is None:
        raise RecipeError(f"{where}: unknown dtype {value!r}; use float16, bfloat16 or float32")
    return code


def parse_size(value: object, where: str = "size") -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, 1000 -> 1000 (GB = 10^9, GiB = 2^30)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = (
        re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if isinstance(value, str)
        else None
    )
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None or float(m.group(1)) <= 0:
        raise RecipeError(f"{where}: {value!r} is not a size; use e.g. 2GB, 500MiB, 1000000")
    return int(float(m.group(1)) * unit)
