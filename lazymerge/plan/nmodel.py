"""The plan of an N-model merge (a recipe with `models` and a method, or a mergekit
config): every tensor of the base, computed by the method from the base and each
model's tensor (LoRAs applied on the fly), with its parameters resolved for that tensor.

The base is always the plan's input 0 (task vectors are taken against it), the other
models follow in the recipe's order; `Resolved.order` keeps the recipe's own order of
all inputs for the methods whose rounding depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.layers import LayerStack, find_stack, natural_key
from lazymerge.meaning.methods.base import Resolved, Scalar
from lazymerge.meaning.methods.registry import BUILDERS, CHECKS
from lazymerge.meaning.order import order_of
from lazymerge.meaning.params import Level, position, resolve
from lazymerge.plan import build
from lazymerge.plan.model import COMPUTE, AdapterUse, Input, MergePlan, PlannedTensor
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.config import model_dir, read_config
from lazymerge.read.tensorref import TensorRef, itemsize
from lazymerge.recipe.methods import METHOD_PARAMS, MethodParams, Param, Scope
from lazymerge.recipe.spec import MethodSpec, Recipe

_PROMOTE = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}


@dataclass(frozen=True)
class _Model:
    """One input of the merge: which recipe entry, its index, its adapters' terms."""

    role: str  # "base" or "models[i]"
    index: CheckpointIndex
    terms: build.Terms
    levels: tuple[Level, ...]  # where its parameters are looked up, in order


@dataclass(frozen=True)
class _Merge:
    recipe: Recipe
    spec: MethodSpec
    method: MethodParams
    models: tuple[_Model, ...]  # the base first
    order: tuple[int, ...]  # the recipe's order of the inputs, by index into models
    stack: LayerStack
    top: Level  # the method-wide parameters


def build_nmodel_plan(recipe: Recipe) -> MergePlan:
    """Open every model's headers and decide every tensor of an N-model merge."""
    assert recipe.merge is not None
    base = CheckpointIndex.open(recipe.base.path)
    config = read_config(model_dir(base.path))
    stack = find_stack(base.tensors, f"base {base.path}", recipe.layers_prefix)
    stack = replace(stack, order=order_of(config))
    merge, uses = _open(recipe, recipe.merge, base, stack)
    kept = sorted(
        (r for r in base if not build.DROPPED.search(r.name)),
        key=lambda r: natural_key(r.name, stack),
    )
    planned = [_plan_tensor(merge, ref) for ref in kept]
    _check_filters(merge, [t.name for t in planned])
    tensors, shards = build.shard(planned, recipe.output.shard_size)
    dropped = tuple(r.name for r in base if build.DROPPED.search(r.name))
    notes = tuple(build.renamed(uses))
    others = tuple(m.index for m in merge.models[1:])
    return MergePlan(
        recipe, base, None, stack, tensors, shards, config, dropped, notes, tuple(uses), others
    )


def _open(
    recipe: Recipe, spec: MethodSpec, base: CheckpointIndex, stack: LayerStack
) -> tuple[_Merge, list[AdapterUse]]:
    top = Level("parameters", spec.parameters)
    base_terms, uses = build.lora_terms("base", recipe.base, base)
    base_levels = (top,) if spec.base_at is None else (_level(spec, spec.base_at), top)
    models = [_Model("base", base, base_terms, base_levels)]
    order = []
    for i, entry in enumerate(spec.models):
        if i == spec.base_at:
            order.append(0)
            continue
        role = f"models[{i}]"
        index = CheckpointIndex.open(entry.model.path)
        _check_depth(index, stack, role, recipe.layers_prefix)
        terms, more = build.lora_terms(role, entry.model, index)
        uses += more
        order.append(len(models))
        models.append(_Model(role, index, terms, (_level(spec, i), top)))
    if spec.base_at is None:
        order.append(0)  # mergekit: an unlisted base joins last
    method = METHOD_PARAMS[spec.name]
    return _Merge(recipe, spec, method, tuple(models), tuple(order), stack, top), uses


def _level(spec: MethodSpec, i: int) -> Level:
    return Level(f"models[{i}].parameters", spec.models[i].parameters)


def _check_depth(index: CheckpointIndex, stack: LayerStack, role: str, prefix: str | None) -> None:
    theirs = find_stack(index.tensors, f"{role} {index.path}", prefix)
    if (theirs.prefix, theirs.count) != (stack.prefix, stack.count):
        raise InputError(
            f"{role} {index.path} has {theirs.count} layers in {theirs.prefix} but the base has "
            f"{stack.count} in {stack.prefix}; a models: merge needs models of the same shape"
        )


def _plan_tensor(merge: _Merge, ref: TensorRef) -> PlannedTensor:
    if not ref.is_float:
        return build.plan_buffer(ref, None)
    inputs: tuple[Input, ...] = (
        Input("base", ref, tuple(merge.models[0].terms.get(ref.name, ()))),
    )
    inputs += tuple(_input(m, ref) for m in merge.models[1:])
    compute = _compute(merge.spec, inputs)
    out = merge.recipe.output.dtype or (ref.dtype if merge.spec.compute is None else compute)
    resolved = _resolve(merge, ref, compute)
    _check(merge, resolved)
    method = BUILDERS[merge.method.name](resolved)
    nbytes = ref.nbytes // itemsize(ref.dtype) * itemsize(out)
    return PlannedTensor(ref.name, out, ref.shape, nbytes, COMPUTE, inputs, method, call=resolved)


def _check(merge: _Merge, call: Resolved) -> None:
    """Values the method refuses (a density outside (0, 1]...), for each model."""
    check = CHECKS[merge.method.name]
    for model, params in zip(merge.models, call.per_input, strict=True):
        try:
            check(merge.method.name, call.shared, params)
        except ValueError as e:
            raise RecipeError(f"{model.role} on {call.tensor}: {e}") from None


def _input(model: _Model, ref: TensorRef) -> Input:
    """A model's tensor under the base's name (an untied head: the embeddings, as
    mergekit loads it), shape-checked."""
    name = ref.name
    if name not in model.index and name.endswith("lm_head.weight"):
        name = next((n for n in model.index.tensors if n.endswith("embed_tokens.weight")), name)
    if name not in model.index:
        raise InputError(f"{model.role} {model.index.path} has no tensor {ref.name}")
    theirs = model.index[name]
    if theirs.shape != ref.shape or not theirs.is_float:
        raise InputError(
            f"{ref.name}: base has {ref.dtype} {list(ref.shape)} but {model.role} "
            f"{theirs.file} has {theirs.dtype} {list(theirs.shape)}"
        )
    return Input(model.role, theirs, tuple(model.terms.get(ref.name, ())))


def _compute(spec: MethodSpec, inputs: Sequence[Input]) -> str:
    """The dtype the arithmetic runs in: float32 (native), a mergekit config's `dtype`,
    or (mergekit without one) the inputs' promoted dtype: fp16 with bf16 is float32."""
    if spec.compute is None:
        return "F32"
    if spec.compute != "inputs":
        return spec.compute
    codes = {i.ref.dtype for i in inputs}
    if len(codes) == 1:
        return codes.pop()
    return max(codes | {"F32"}, key=lambda c: _PROMOTE[c])


def _resolve(merge: _Merge, ref: TensorRef, compute: str) -> Resolved:
    t = position(ref.name, merge.stack)
    shared = {
        p.name: _value(p, (merge.top,), ref.name, t, "")
        for p in merge.method.params
        if p.scope == Scope.SHARED
    }
    per_input = []
    for k, model in enumerate(merge.models):
        scopes = (Scope.INPUT,) if k == 0 else (Scope.INPUT, Scope.NON_BASE)
        params = [p for p in merge.method.params if p.scope in scopes]
        per_input.append({p.name: _value(p, model.levels, ref.name, t, model.role) for p in params})
    return Resolved(
        ref.name, ref.shape, compute, merge.spec.seed, shared, tuple(per_input), merge.order
    )


def _value(param: Param, levels: Sequence[Level], name: str, t: float, who: str) -> Scalar:
    found = resolve(param, levels, name, t)
    if found.value is None:
        whose = f" for {who}" if who else ""
        raise RecipeError(
            f"{param.name}: no value{whose} on {name}; give it in that model's parameters "
            "or the top-level parameters"
        )
    return found.value


def _check_filters(merge: _Merge, names: Sequence[str]) -> None:
    """A filter that matches no tensor is a mistake (a typo), not a no-op."""
    levels = {lv.where: lv for m in merge.models for lv in m.levels}
    for level in levels.values():
        for key, setting in level.parameters.items():
            for k, cond in enumerate(setting):
                if cond.filter is not None and not any(cond.filter in n for n in names):
                    raise RecipeError(
                        f"{level.where}.{key}[{k}]: filter {cond.filter!r} matches no tensor"
                    )
