"""The plan of an N-model merge (a recipe with `models` and a method, or a mergekit
config): every tensor of the base, computed by the method from the base and each
model's tensor (LoRAs applied on the fly), with its parameters resolved for that tensor.

The base is always the plan's input 0 (task vectors are taken against it), the other
models follow in the recipe's order; `Resolved.order` keeps the recipe's own order of
all inputs for the methods whose rounding depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.layers import LayerStack, find_stack, natural_key
from lazymerge.meaning.methods import Method
from lazymerge.meaning.methods.base import Resolved, Scalar
from lazymerge.meaning.methods.pointwise import Passthrough
from lazymerge.meaning.methods.registry import BUILDERS, CHECKS
from lazymerge.meaning.modules import UNPLACED, arch_name
from lazymerge.meaning.order import order_of
from lazymerge.meaning.params import Level, position, resolve, varies
from lazymerge.meaning.vocab import MEAN
from lazymerge.plan import build
from lazymerge.plan.model import (
    COMPUTE,
    COPY,
    AdapterUse,
    Input,
    MergePlan,
    PlannedTensor,
    RowMap,
)
from lazymerge.plan.vocab import VocabPlan, plan_vocab, with_tokenizer
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.config import checkpoint_config, model_dir
from lazymerge.read.tensorref import itemsize
from lazymerge.recipe.methods import METHOD_PARAMS, MethodParams, Param, Scope
from lazymerge.recipe.spec import MethodSpec, ModelSpec, Recipe

_PROMOTE = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}


@dataclass(frozen=True)
class Model:
    """One input of the merge: which recipe entry, its index, its adapters' terms."""

    role: str  # "base" or "models[i]"
    index: CheckpointIndex
    terms: build.Terms
    levels: tuple[Level, ...]  # where its parameters are looked up, in order
    shift: int = 0  # its layer for output layer j: j + shift (a slice's own range)

    def source(self, name: str, stack: LayerStack) -> str:
        """The name this input's tensor has for output tensor `name`."""
        layer = stack.layer_of(name)
        if layer is None or not self.shift:
            return name
        return f"{stack.prefix}.{layer + self.shift}.{name.split(f'.{layer}.', 1)[1]}"


@dataclass(frozen=True)
class Group:
    """Output tensors one set of inputs makes: every layer of a `models:` merge, or one
    slice's run of layers (plan/slices.py) with the tensors outside the layers it owns."""

    recipe: Recipe
    spec: MethodSpec
    method: MethodParams
    models: tuple[Model, ...]  # input 0 first: the base, or (none given) the first model
    order: tuple[int, ...]  # the recipe's order of the inputs, by index into models
    stack: LayerStack  # the output's decoder layers
    top: tuple[Level, ...]  # the method-wide parameters (a slice's, then the recipe's)
    span: tuple[int, int] | None = None  # its output layers [start, end); None: all
    has_base: bool = True
    vocab: VocabPlan | None = None  # the recipe's tokenizer source: vocabularies aligned
    unplaced: str | None = None  # a modular architecture without a module table (UNPLACED)

    def t(self, name: str) -> float:
        """The layer position of output tensor `name` within the group (mergekit's t: a
        slice's own layers run 0..1; 1 for a slice of one layer; 0 outside the layers)."""
        if self.span is None:
            return position(name, self.stack)
        layer = self.stack.layer_of(name)
        if layer is None:
            return 0.0
        start, end = self.span
        return (layer - start) / (end - start - 1) if end - start > 1 else 1.0


def build_nmodel_plan(recipe: Recipe) -> MergePlan:
    """Open every model's headers and decide every tensor of an N-model merge."""
    assert recipe.merge is not None
    base = CheckpointIndex.open(recipe.base.path)
    config = checkpoint_config(base.path)
    stack = find_stack(base.tensors, f"base {base.path}", recipe.layers_prefix)
    stack = replace(stack, order=order_of(config))
    merge, uses = _open(recipe, recipe.merge, base, stack)
    vocab = plan_vocab(recipe.tokenizer, recipe.models()) if recipe.tokenizer else None
    arch = arch_name(config)
    unplaced = arch if arch in UNPLACED and recipe.merge.source == "mergekit" else None
    merge = replace(merge, vocab=vocab, unplaced=unplaced)
    kept = sorted(
        (r for r in base if not build.DROPPED.search(r.name)),
        key=lambda r: natural_key(r.name, stack),
    )
    planned = [plan_tensor(merge, ref.name) for ref in kept]
    check_filters([merge], [t.name for t in planned])
    tensors, shards = build.shard(planned, recipe.output.shard_limit)
    dropped = tuple(r.name for r in base if build.DROPPED.search(r.name))
    notes = tuple(build.renamed(uses))
    others = tuple(m.index for m in merge.models[1:])
    plan = MergePlan(
        recipe, base, None, stack, tensors, shards, config, dropped, notes, tuple(uses), others
    )
    return with_tokenizer(plan, vocab)


def _open(
    recipe: Recipe, spec: MethodSpec, base: CheckpointIndex, stack: LayerStack
) -> tuple[Group, list[AdapterUse]]:
    top = Level("parameters", spec.parameters)
    role = "base" if spec.has_base else "models[0]"
    base_terms, uses = build.lora_terms(role, recipe.base, base)
    base_levels = (top,) if spec.base_at is None else (_level(spec, spec.base_at), top)
    models = [Model(role, base, base_terms, base_levels)]
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
        models.append(Model(role, index, terms, (_level(spec, i), top)))
    if spec.base_at is None:
        order.append(0)  # mergekit: an unlisted base joins last
    method = METHOD_PARAMS[spec.name]
    group = Group(recipe, spec, method, tuple(models), tuple(order), stack, (top,))
    return replace(group, has_base=spec.has_base), uses


def each_model(
    recipe: Recipe, spec: MethodSpec
) -> Iterator[tuple[ModelSpec, str, CheckpointIndex, dict[str, Any] | None]]:
    """Each model a sliced or modular recipe names, once, the base (or the config's
    donor) first: the model, its role in messages ("base", "models[i]"), its opened
    index and its config."""
    models = [recipe.base] + [m.model for m in spec.models if m.model != recipe.base]
    for model in models:
        i = next((k for k, m in enumerate(spec.models) if m.model == model), None)
        role = "base" if model == recipe.base and spec.has_base else f"models[{i}]"
        index = CheckpointIndex.open(model.path)
        yield model, role, index, checkpoint_config(index.path)


def _level(spec: MethodSpec, i: int) -> Level:
    return Level(f"models[{i}].parameters", spec.models[i].parameters)


def _check_depth(index: CheckpointIndex, stack: LayerStack, role: str, prefix: str | None) -> None:
    theirs = find_stack(index.tensors, f"{role} {index.path}", prefix)
    if (theirs.prefix, theirs.count) != (stack.prefix, stack.count):
        raise InputError(
            f"{role} {index.path} has {theirs.count} layers in {theirs.prefix} but the base has "
            f"{stack.count} in {stack.prefix}; a models: merge needs models of the same shape"
        )


def plan_tensor(group: Group, name: str) -> PlannedTensor:
    """Output tensor `name`: the method over each input's tensor for it."""
    first = group.models[0]
    source = first.source(name, group.stack)
    if source not in first.index:
        raise InputError(f"{first.role} {first.index.path} has no tensor {source}")
    ref = first.index[source]
    if not ref.is_float:
        return replace(build.plan_buffer(ref, None), name=name)
    inputs: tuple[Input, ...] = (Input(first.role, ref, tuple(first.terms.get(ref.name, ()))),)
    by_token = group.vocab is not None and build.is_vocab(name)
    inputs += tuple(
        _input(m, inputs[0], m.source(name, group.stack), by_token) for m in group.models[1:]
    )
    compute = _compute(group.spec, inputs)
    shape = ref.shape
    if group.vocab is not None and by_token:
        inputs = by_tokens(group, name, inputs, compute)
        shape = (group.vocab.out.rows, *ref.shape[1:])
    out = group.recipe.output.dtype or _natural_out(group, ref.dtype, compute)
    resolved = _resolve(group, name, shape, compute)
    _check(group, resolved)
    _check_tower(group, name)
    method = BUILDERS[group.method.name](resolved)
    nbytes = math.prod(shape) * itemsize(out)
    action = COPY if copies(method, inputs, compute, out) else COMPUTE
    return PlannedTensor(name, out, shape, nbytes, action, inputs, method, call=resolved)


def by_tokens(
    group: Group, name: str, inputs: tuple[Input, ...], compute: str
) -> tuple[Input, ...]:
    """A vocabulary tensor's inputs aligned to the output's tokenizer: each read by token
    (RowMap), bar those whose rows already are the output's one for one."""
    assert group.vocab is not None
    paths = tuple(model_dir(m.index.path) for m in group.models)
    aligned = group.vocab.alignment(paths, paths[0] if group.has_base else None)
    refs = [i.ref for i in inputs]
    defaults = {
        row: tuple((refs[m], r) for m, r in parts) for row, parts in aligned.defaults.items()
    }
    pad = group.vocab.out.rows - group.vocab.out.size  # rows each model's mean fills
    out = []
    for inp, own in zip(inputs, aligned.own, strict=True):
        own = np.concatenate([own, np.full(pad, MEAN, dtype=own.dtype)]) if pad else own
        if not defaults and len(own) == inp.ref.rows and bool((own == np.arange(len(own))).all()):
            out.append(inp)
        else:
            out.append(replace(inp, gather=RowMap(own, defaults, compute)))
    adapted = next((i for i in out if i.terms), None)
    if adapted is not None and any(i.gather is not None for i in out):
        raise RecipeError(
            f"{name}: {adapted.role}'s adapter changes a vocabulary tensor the tokenizer "
            "source realigns by token; that is not supported yet (merge the adapter first)"
        )
    return tuple(out)


def _natural_out(group: Group, stored: str, compute: str) -> str:
    """The output dtype when the recipe sets none: the input's (native recipes), the
    compute dtype (mergekit's), but fp32 where mergekit's result is fp32 whatever its
    inputs (arcee_fusion's float32 mask promotes it)."""
    if group.spec.compute is None:
        return stored
    return "F32" if group.method.name == "arcee_fusion" and compute != "F64" else compute


def copies(method: Method, inputs: Sequence[Input], compute: str, out: str) -> bool:
    """The output is one input's bytes as they are (passthrough, unscaled, no LoRA, no
    rounding on the way): a copy, at the disk's speed."""
    if not isinstance(method, Passthrough) or method.scale != 1.0 or len(inputs) != 1:
        return False
    ref = inputs[0].ref
    exact = compute in (ref.dtype, "F32", "F64")
    return (
        not inputs[0].terms
        and inputs[0].gather is None
        and ref.copyable
        and ref.dtype == out
        and exact
    )


def _check(group: Group, call: Resolved) -> None:
    """Values the method refuses (a density outside (0, 1]...), for each model."""
    check = CHECKS[group.method.name]
    whose: list[tuple[str, Mapping[str, Scalar]]] = [("parameters", {})]
    whose += [(m.role, p) for m, p in zip(group.models, call.per_input, strict=True)]
    for who, params in whose:  # the shared values first, alone
        try:
            check(group.method.name, call.shared, params)
        except ValueError as e:
            raise RecipeError(f"{who} on {call.tensor}: {e}") from None


def _input(model: Model, first: Input, name: str, by_token: bool = False) -> Input:
    """A model's tensor `name` (an untied head: the embeddings, as mergekit loads it),
    shape-checked against input 0's (`by_token`: bar its rows, the vocabulary's)."""
    if name not in model.index and name.endswith("lm_head.weight"):
        name = next((n for n in model.index.tensors if n.endswith("embed_tokens.weight")), name)
    if name not in model.index:
        raise InputError(f"{model.role} {model.index.path} has no tensor {name}")
    ref, theirs = first.ref, model.index[name]
    same = theirs.shape[1:] == ref.shape[1:] if by_token else theirs.shape == ref.shape
    if not same or not theirs.is_float:
        raise InputError(
            f"{name}: {first.role} has {ref.dtype} {list(ref.shape)} but {model.role} "
            f"{theirs.file} has {theirs.dtype} {list(theirs.shape)}"
        )
    return Input(model.role, theirs, tuple(model.terms.get(name, ())))


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


def _check_tower(group: Group, name: str) -> None:
    """A tower's tensor of an UNPLACED architecture whose parameters vary with t: its
    value here (t = 0) is not mergekit's (the tower's own t): one line."""
    towers = group.stack.towers
    if group.unplaced is None or not any(name.startswith(f"{p}.") for p in towers):
        return
    levels = [group.top, *(m.levels for m in group.models)]
    if any(varies(p, lv, name) for p in group.method.params for lv in levels):
        raise RecipeError(
            f"{name}: a parameter varies over the layers, and mergekit gives "
            f"{group.unplaced}'s vision layers positions of their own (per module); "
            "lazymerge knows the modules of Gemma 3 and Mistral 3 only: give the tower "
            "constant values (a filter) for now"
        )


def _resolve(group: Group, name: str, shape: tuple[int, ...], compute: str) -> Resolved:
    t = group.t(name)
    params = group.method.params
    shared = {p.name: _value(p, group.top, name, t, "") for p in params if p.scope == Scope.SHARED}
    per_input = []
    for k, model in enumerate(group.models):
        scopes = (Scope.INPUT,) if k == 0 and group.has_base else (Scope.INPUT, Scope.NON_BASE)
        mine = [p for p in params if p.scope in scopes]
        per_input.append({p.name: _value(p, model.levels, name, t, model.role) for p in mine})
    return Resolved(
        name, shape, compute, group.spec.seed, shared, tuple(per_input), group.order,
        has_base=group.has_base,
    )  # fmt: skip


def _value(param: Param, levels: Sequence[Level], name: str, t: float, who: str) -> Scalar:
    found = resolve(param, levels, name, t)
    if found.value is None:
        whose = f" for {who}" if who else ""
        raise RecipeError(
            f"{param.name}: no value{whose} on {name}; give it in that model's parameters "
            "or the top-level parameters"
        )
    return found.value


def check_filters(groups: Sequence[Group], names: Sequence[str]) -> None:
    """A filter that matches no tensor is a mistake (a typo), not a no-op."""
    levels = {lv.where: lv for g in groups for m in g.models for lv in (*m.levels, *g.top)}
    for level in levels.values():
        for key, setting in level.parameters.items():
            for k, cond in enumerate(setting):
                if cond.filter is not None and not any(cond.filter in n for n in names):
                    raise RecipeError(
                        f"{level.where}.{key}[{k}]: filter {cond.filter!r} matches no tensor"
                    )
