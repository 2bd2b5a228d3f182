"""MergePlan: every output tensor's inputs, ratio, LoRA terms, shard and offset.

Decided from headers alone, before any tensor data is read, so a plan can be printed,
checked and executed, and the same inputs always give the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lazymerge.errors import InputError, RecipeError
from lazymerge.gradient import all_ratios, layer_count, natural_key
from lazymerge.index import CheckpointIndex, TensorRef, itemsize
from lazymerge.lora import REPLACE, LoraAdapter, LoraTerm
from lazymerge.recipe import ModelSpec, Recipe

COPY_BASE, COPY_OTHER, COMPUTE = "copy-base", "copy-other", "compute"
# 2023 Llama .bin checkpoints carry each layer's RoPE `inv_freq` buffer. It is derived
# from the config, transformers recomputes it and no longer loads it, and a safetensors
# partner usually lacks it: it is left out of the output, always.
DROPPED = re.compile(r"(?:^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where its bytes come from and where they go."""

    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    nbytes: int  # in the output dtype
    ratio: float  # fraction of `other`
    action: str  # COPY_BASE, COPY_OTHER or COMPUTE
    base: TensorRef
    other: TensorRef | None = None  # None when ratio == 0
    base_loras: tuple[LoraTerm, ...] = ()  # only those that matter (ratio < 1)
    other_loras: tuple[LoraTerm, ...] = ()  # only those that matter (ratio > 0)
    shard: int = 0  # set when the plan is split into shards
    offset: int = 0  # within the shard's data section
    shared_rows: int = -1  # rows `other` has too (vocab mismatch); -1: all of them

    def __post_init__(self) -> None:
        if self.shared_rows < 0:
            object.__setattr__(self, "shared_rows", self.rows)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def reads(self) -> list[TensorRef]:
        """The input tensors producing this one reads (LoRA factors included)."""
        out = [] if self.action == COPY_OTHER else [self.base]
        if self.other is not None and self.action != COPY_BASE:
            out.append(self.other)
        return out + [ref for lo in self.base_loras + self.other_loras for ref in lo.refs()]


@dataclass(frozen=True)
class Shard:
    name: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    base: CheckpointIndex
    other: CheckpointIndex | None
    n_layers: int
    tensors: tuple[PlannedTensor, ...]
    shards: tuple[Shard, ...]
    dropped: tuple[str, ...] = ()  # base tensors deliberately left out (see DROPPED)
    notes: tuple[str, ...] = ()  # what the user should know (vocabulary mismatches)

    @property
    def bytes_to_write(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_to_read(self) -> int:
        """Input bytes the merge touches: sources of each tensor plus their LoRA factors."""
        return sum(ref.nbytes for ref in self.reads())

    def reads(self) -> list[TensorRef]:
        """Every input tensor the merge reads, in execution order (A factors included)."""
        return [ref for t in self.tensors for ref in t.reads()]


def build_plan(recipe: Recipe) -> MergePlan:
    """Open every input's headers and decide the whole merge."""
    base = CheckpointIndex.open(recipe.base.path)
    n_layers = layer_count(base.tensors)
    other = CheckpointIndex.open(recipe.other.path) if recipe.other else None
    if other is not None:
        _check_layers(recipe, base, other, n_layers)
    base_terms = _lora_terms(recipe.base, base)
    other_terms = _lora_terms(recipe.other, other) if recipe.other and other else {}
    kept = sorted(
        (r for r in base if not DROPPED.search(r.name)), key=lambda r: natural_key(r.name)
    )
    ratios = all_ratios([r.name for r in kept], recipe.gradient, n_layers) if other else {}
    planned = [
        _plan_tensor(recipe, ref, other, ratios.get(ref.name, 0.0), base_terms, other_terms)
        for ref in kept
    ]
    tensors, shards = _shard(planned, recipe.output.shard_size)
    dropped = tuple(r.name for r in base if DROPPED.search(r.name))
    return MergePlan(recipe, base, other, n_layers, tensors, shards, dropped, vocab_notes(tensors))


def _check_layers(
    recipe: Recipe, base: CheckpointIndex, other: CheckpointIndex, n_layers: int
) -> None:
    n_other = layer_count(other.tensors)
    if n_other != n_layers:
        raise InputError(
            f"base {base.path} has {n_layers} layers but other {other.path} has {n_other}; "
            "a layer gradient needs models of the same depth"
        )
    for i, rule in enumerate(recipe.gradient):
        if rule.layers is not None and rule.layers[1] > n_layers:
            start, end = rule.layers
            raise RecipeError(
                f"gradient[{i}].layers: span [{start}, {end}) goes past the last layer; "
                f"the models have {n_layers} layers (0..{n_layers - 1})"
            )


def _lora_terms(spec: ModelSpec, index: CheckpointIndex) -> dict[str, list[LoraTerm]]:
    terms: dict[str, list[LoraTerm]] = {}
    for lo in spec.loras:
        adapter = LoraAdapter.open(lo.path, lo.weight)
        adapter.check_against(index)
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
    return terms


def _plan_tensor(
    recipe: Recipe,
    ref: TensorRef,
    other: CheckpointIndex | None,
    ratio: float,
    base_terms: dict[str, list[LoraTerm]],
    other_terms: dict[str, list[LoraTerm]],
) -> PlannedTensor:
    if not ref.is_float:
        # Integer/bool buffers are not blended: the base's values, as they are.
        action = COPY_BASE if ref.contiguous else COMPUTE
        return PlannedTensor(ref.name, ref.dtype, ref.shape, ref.nbytes, 0.0, action, ref)
    dtype = recipe.output.dtype or ref.dtype
    other_ref = _other_ref(ref, other) if other is not None and ratio > 0 else None
    shared = min(ref.rows, other_ref.rows) if other_ref is not None else ref.rows
    # The base's own rows matter where it has rows the other lacks, whatever the ratio.
    base_loras = tuple(base_terms.get(ref.name, ())) if ratio < 1 or shared < ref.rows else ()
    other_loras = tuple(other_terms.get(ref.name, ())) if ratio > 0 else ()
    if ratio == 0 and not base_loras and _copyable(ref, dtype):
        action = COPY_BASE
    elif (
        ratio == 1
        and not other_loras
        and other_ref is not None
        and _copyable(other_ref, dtype)
        and other_ref.shape == ref.shape
    ):
        action = COPY_OTHER
    else:
        action = COMPUTE
    nbytes = ref.nbytes // itemsize(ref.dtype) * itemsize(dtype)
    return PlannedTensor(
        ref.name, dtype, ref.shape, nbytes, ratio, action,
        base=ref, other=other_ref, base_loras=base_loras, other_loras=other_loras, shared_rows=shared,
    )  # fmt: skip


def _copyable(ref: TensorRef, dtype: str) -> bool:
    """Its bytes are the output's bytes: same dtype, plain row-major layout."""
    return ref.dtype == dtype and ref.contiguous


# Token embeddings and output heads: their rows are the vocabulary, which fine-tunes grow.
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte)\.weight$")


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


def vocab_notes(tensors: Sequence[PlannedTensor]) -> tuple[str, ...]:
    """What a vocabulary mismatch did, tensor by tensor (BlockMerge's behaviour)."""
    notes = []
    for t in tensors:
        if t.other is not None and t.other.rows != t.rows:
            extra = (
                f"the base's {t.rows - t.shared_rows} extra rows are kept"
                if t.rows > t.shared_rows
                else f"the other's {t.other.rows - t.rows} extra rows are dropped"
            )
            notes.append(
                f"{t.name}: vocabularies differ ({t.rows} vs {t.other.rows} rows); blending the {t.shared_rows} shared rows, {extra}"
            )
    return tuple(notes)


def _shard(
    planned: Sequence[PlannedTensor], shard_size: int
) -> tuple[tuple[PlannedTensor, ...], tuple[Shard, ...]]:
    """Greedy split in plan order (HF's rule: a tensor larger than a shard gets its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = [Shard(shard_name(k, n), tuple(_place(group, k))) for k, group in enumerate(groups)]
    return tuple(t for s in shards for t in s.tensors), tuple(shards)


def _place(group: Iterable[PlannedTensor], k: int) -> Iterable[PlannedTensor]:
    offset = 0
    for t in group:
        yield replace(t, shard=k, offset=offset)
        offset += t.nbytes


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def plan_inputs(plan: MergePlan) -> list[Path]:
    """Every input file the plan reads (model shards and adapter weights)."""
    files = list(plan.base.files) + (list(plan.other.files) if plan.other else [])
    for t in plan.tensors:
        files += [lo.a.file for lo in t.base_loras + t.other_loras]
    return list(dict.fromkeys(files))
