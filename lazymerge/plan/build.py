"""build_plan: open every input's headers and decide the whole merge, before any tensor
data is read, so a plan can be printed, checked and executed, and the same inputs always
give the same bytes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.adapters import REPLACE, LoraAdapter, LoraTerm
from lazymerge.meaning.layers import LayerStack, find_stack, natural_key, numbered_stacks
from lazymerge.meaning.methods import Linear
from lazymerge.meaning.names import describe
from lazymerge.meaning.order import order_of
from lazymerge.meaning.ratios import all_ratios, first_rule
from lazymerge.plan.model import (
    COMPUTE,
    COPY_BASE,
    COPY_OTHER,
    Action,
    AdapterUse,
    Input,
    MergePlan,
    PlannedTensor,
    Role,
    Shard,
)
from lazymerge.plan.shards import shard_name, split
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.config import checkpoint_config
from lazymerge.read.tensorref import TensorRef, itemsize
from lazymerge.recipe.spec import ModelSpec, Recipe

# 2023 Llama .bin checkpoints carry each layer's RoPE `inv_freq` buffer. It is derived
# from the config, transformers recomputes it and no longer loads it, and a safetensors
# partner usually lacks it: it is left out of the output, always.
DROPPED = re.compile(r"(?:^|\.)rotary_emb\.inv_freq$")
# Token embeddings and output heads: their rows are the vocabulary, which fine-tunes grow.
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte)\.weight$")
Terms = dict[str, list[LoraTerm]]  # target tensor name -> the terms that change it


def is_vocab(name: str) -> bool:
    """A tensor whose rows are the vocabulary's (embeddings, output head)."""
    return _VOCAB.search(name) is not None


@dataclass(frozen=True)
class _Sources:
    """What every tensor's decision draws on: the recipe, both models, their terms."""

    recipe: Recipe
    other: CheckpointIndex | None
    base_terms: Terms
    other_terms: Terms


def build_plan(recipe: Recipe) -> MergePlan:
    """Open every input's headers (and the base's config.json) and decide the whole merge."""
    plan = _build(recipe)
    if recipe.output.format == "gguf":  # the same values, encoded in one GGUF: plan/gguf.py
        from lazymerge.plan.gguf import to_gguf

        return to_gguf(plan)
    return plan


def _build(recipe: Recipe) -> MergePlan:
    if recipe.merge is not None and recipe.merge.slices:  # layer surgery: plan/slices.py
        from lazymerge.plan.slices import build_sliced_plan

        return build_sliced_plan(recipe)
    from lazymerge.plan.modules import build_module_plan, by_modules

    if by_modules(recipe):  # a modular architecture, module by module: plan/modules.py
        return build_module_plan(recipe)
    if recipe.merge is not None:  # N models and a method: plan/nmodel.py
        from lazymerge.plan.nmodel import build_nmodel_plan

        return build_nmodel_plan(recipe)
    base = CheckpointIndex.open(recipe.base.path)
    config = checkpoint_config(base.path)
    other = CheckpointIndex.open(recipe.other.path) if recipe.other else None
    # The family's natural order (config.json model_type): the output's, and tensor mode's.
    stack = replace(_layer_stack(recipe, base, other), order=order_of(config))
    base_terms, uses = lora_terms("base", recipe.base, base)
    other_terms: Terms = {}
    if recipe.other and other:
        other_terms, other_uses = lora_terms("other", recipe.other, other)
        uses += other_uses
    sources = _Sources(recipe, other, base_terms, other_terms)
    kept = sorted(
        (r for r in base if not DROPPED.search(r.name)), key=lambda r: natural_key(r.name, stack)
    )
    ratios = all_ratios([r.name for r in kept], recipe.gradient, stack) if other else {}
    planned = [_plan_tensor(sources, ref, ratios.get(ref.name, 0.0)) for ref in kept]
    tensors, shards = shard(planned, recipe.output.shard_limit)
    dropped = tuple(r.name for r in base if DROPPED.search(r.name))
    notes = tuple(renamed(uses)) + vocab_notes(tensors)
    return MergePlan(
        recipe, base, other, stack, tensors, shards, config, dropped, notes, tuple(uses)
    )


def _layer_stack(
    recipe: Recipe, base: CheckpointIndex, other: CheckpointIndex | None
) -> LayerStack:
    """The base's decoder layers (see meaning/layers.py), the same in the other model. A
    merge whose rules never name a layer (an adapter alone, tensor-mode rules) goes on
    where the stack can't be told: it then has no layers to show."""
    needed = other is not None and any(r.over == "layers" for r in recipe.gradient)
    try:
        stack = find_stack(base.tensors, f"base {base.path}", recipe.layers_prefix)
    except InputError:
        if needed:
            raise
        return LayerStack(None, 0, tuple(sorted(numbered_stacks(base.tensors))))
    if other is not None and needed:
        theirs = find_stack(other.tensors, f"other {other.path}", recipe.layers_prefix)
        _check_layers(recipe, (base, stack), (other, theirs))
    return stack


def _check_layers(
    recipe: Recipe,
    base: tuple[CheckpointIndex, LayerStack],
    other: tuple[CheckpointIndex, LayerStack],
) -> None:
    (index, mine), (their_index, theirs) = base, other
    if theirs.count != mine.count or theirs.prefix != mine.prefix:
        where = f" in {theirs.prefix}" if theirs.prefix != mine.prefix else ""
        raise InputError(
            f"base {index.path} has {mine.count} layers but other {their_index.path} has "
            f"{theirs.count}{where}; a layer gradient needs models of the same depth"
        )
    n_layers = mine.count
    for i, rule in enumerate(recipe.gradient):
        if rule.layers is not None and rule.layers[1] > n_layers:
            start, end = rule.layers
            raise RecipeError(
                f"gradient[{i}].layers: span [{start}, {end}) goes past the last layer; "
                f"the models have {n_layers} layers (0..{n_layers - 1})"
            )


def lora_terms(
    role: Role, spec: ModelSpec, index: CheckpointIndex
) -> tuple[Terms, list[AdapterUse]]:
    """Every term of model `role`'s adapters, by target, in the order they apply; and
    what each adapter was found to hold."""
    terms: Terms = {}
    uses = []
    for lo in spec.loras:
        adapter, mapping = LoraAdapter.open(lo.path, lo.weight).fit(index)
        uses.append(AdapterUse(role, lo, adapter.path, len(adapter.terms), mapping))
        for term in adapter.terms:
            if not index[term.target].is_float:
                raise InputError(f"{lo.path}: targets {term.target}, which is not a float tensor")
            terms.setdefault(term.target, []).append(term)
    for target, ts in terms.items():
        # Replacements first, then the deltas, DoRA's renormalisation last.
        ts.sort(key=lambda t: (t.kind != REPLACE, t.magnitude is not None))
        deltas = [t for t in ts if t.kind != REPLACE]
        if any(t.magnitude is not None for t in deltas) and len(deltas) > 1:
            raise InputError(
                f"{target}: a DoRA adapter and another adapter both change it; DoRA's "
                "magnitude is defined for its own delta only, so merge them one at a time"
            )
    return terms, uses


def _plan_tensor(src: _Sources, ref: TensorRef, ratio: float) -> PlannedTensor:
    rule = first_rule(ref.name, src.recipe.gradient)
    if not ref.is_float:
        return plan_buffer(ref, rule)
    dtype = src.recipe.output.dtype or ref.dtype
    other_ref = _other_ref(ref, src.other) if src.other is not None and ratio > 0 else None
    shared = min(ref.rows, other_ref.rows) if other_ref is not None else ref.rows
    # The base's own rows matter where it has rows the other lacks, whatever the ratio.
    base_loras = tuple(src.base_terms.get(ref.name, ())) if ratio < 1 or shared < ref.rows else ()
    other_loras = tuple(src.other_terms.get(ref.name, ())) if ratio > 0 else ()
    base = Input("base", ref, base_loras)
    other = Input("other", other_ref, other_loras) if other_ref is not None else None
    action = _action(ratio, base, other, dtype)
    method = None
    if other is None:
        inputs: tuple[Input, ...] = (base,)
    else:
        inputs = (other,) if action == COPY_OTHER else (base, other)
    if action == COMPUTE:
        method = Linear((1.0 - ratio, ratio) if other is not None else (1.0,))
    nbytes = ref.numel * itemsize(dtype)
    return PlannedTensor(
        ref.name, dtype, ref.shape, nbytes, action, inputs, method, ratio, rule, shared_rows=shared
    )


def plan_buffer(ref: TensorRef, rule: int | None) -> PlannedTensor:
    """Integer/bool buffers are not blended: the base's values, as they are."""
    action, method = (COPY_BASE, None) if ref.copyable else (COMPUTE, Linear((1.0,)))
    inputs = (Input("base", ref),)
    return PlannedTensor(
        ref.name,
        ref.dtype,
        ref.shape,
        ref.numel * itemsize(ref.dtype),
        action,
        inputs,
        method,
        rule=rule,
    )


def _action(ratio: float, base: Input, other: Input | None, dtype: str) -> Action:
    """Copy a side's bytes when the output is exactly them; compute otherwise."""
    if ratio == 0 and not base.terms and _copyable(base.ref, dtype):
        return COPY_BASE
    if (
        ratio == 1
        and other is not None
        and not other.terms
        and _copyable(other.ref, dtype)
        and other.ref.shape == base.ref.shape
    ):
        return COPY_OTHER
    return COMPUTE


def _copyable(ref: TensorRef, dtype: str) -> bool:
    """Its values are the output's: same dtype, not a strided view."""
    return ref.dtype == dtype and ref.copyable


def _other_ref(ref: TensorRef, other: CheckpointIndex) -> TensorRef:
    if ref.name not in other:
        raise InputError(f"{other.path} has no tensor {ref.name}, which the gradient blends")
    o = other[ref.name]
    vocab_only = (
        _VOCAB.search(ref.name) is not None and o.shape[1:] == ref.shape[1:] and len(ref.shape) == 2
    )
    if o.shape != ref.shape and not vocab_only:
        raise InputError(
            f"{ref.name}: base {ref.file} has shape {list(ref.shape)} but other {o.file} "
            f"has {list(o.shape)}"
        )
    if not o.is_float:
        raise InputError(f"{ref.name}: other {o.file} stores it as {o.dtype}, not a float")
    return o


def renamed(uses: Sequence[AdapterUse]) -> Iterable[str]:
    for use in uses:
        if use.renamed:
            yield (
                f"{use.spec.path}: module names mapped to the checkpoint's "
                f"({describe(use.renamed)})"
            )


def vocab_notes(tensors: Sequence[PlannedTensor]) -> tuple[str, ...]:
    """What a vocabulary mismatch did, tensor by tensor (BlockMerge's behaviour)."""
    notes = []
    for t in tensors:
        other = t.side("other")
        if other is not None and other.ref.rows != t.rows:
            extra = (
                f"the base's {t.rows - t.shared_rows} extra rows are kept"
                if t.rows > t.shared_rows
                else f"the other's {other.ref.rows - t.rows} extra rows are dropped"
            )
            notes.append(
                f"{t.name}: vocabularies differ ({t.rows} vs {other.ref.rows} rows); "
                f"blending the {t.shared_rows} shared rows, {extra}"
            )
    return tuple(notes)


def shard(
    planned: Sequence[PlannedTensor], shard_size: int
) -> tuple[tuple[PlannedTensor, ...], tuple[Shard, ...]]:
    """Split in plan order (see shards.split) and give each tensor its shard and offset."""
    groups = split([t.nbytes for t in planned], shard_size)
    shards = [
        Shard(shard_name(k, len(groups)), tuple(_place((planned[i] for i in group), k)))
        for k, group in enumerate(groups)
    ]
    return tuple(t for s in shards for t in s.tensors), tuple(shards)


def _place(group: Iterable[PlannedTensor], k: int) -> Iterable[PlannedTensor]:
    offset = 0
    for t in group:
        yield replace(t, shard=k, offset=offset)
        offset += t.nbytes
