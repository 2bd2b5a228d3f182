"""The plan of a merge by slices (recipe/slices.py, mergekit's `slices:`): the output's
decoder layers slice by slice, renumbered, each made by the method from its sources'
layers; the tensors outside the layers from the first slice's sources (those before the
layers: embeddings) or the last's (final norm, head), as mergekit plans them.

The output's config.json is the base's (none named: the first slice's first source's)
with its layer count, and every per-layer list in it (`layer_types`...), following the
output's layers. A layer taken twice is read twice and written twice; passthrough of an
unchanged tensor is a plain copy of its bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.layers import LayerStack, find_stack, natural_key
from lazymerge.meaning.modules import architecture, modules_of
from lazymerge.meaning.order import order_of
from lazymerge.meaning.params import Level
from lazymerge.plan import build
from lazymerge.plan.model import AdapterUse, MergePlan, PlannedTensor
from lazymerge.plan.nmodel import Group, Model, check_filters, each_model, plan_tensor
from lazymerge.plan.vocab import plan_vocab, with_tokenizer
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.recipe.methods import METHOD_PARAMS
from lazymerge.recipe.spec import MethodSpec, ModelSpec, Recipe, SliceSpec

# config.json keys that count the decoder layers, by family (GPT-2, MPT... spell it so).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
# Gemma-style: every p-th layer is global, the rest sliding-window, when no layer_types.
PATTERN_KEYS = ("sliding_window_pattern", "_sliding_window_pattern")


@dataclass(frozen=True)
class _Opened:
    """One model of the recipe, opened once however many slices name it."""

    role: str
    index: CheckpointIndex
    terms: build.Terms
    stack: LayerStack
    config: dict[str, Any] | None


def build_sliced_plan(recipe: Recipe) -> MergePlan:
    """Open every model's headers and decide every output tensor, slice by slice."""
    spec = recipe.merge
    assert spec is not None and spec.slices
    opened, uses = _open_all(recipe, spec)
    donor = opened[recipe.base]
    groups, count = _groups(recipe, spec, opened)
    stack = LayerStack(donor.stack.prefix, count, (), order_of(donor.config))
    vocab = plan_vocab(recipe.tokenizer, recipe.models()) if recipe.tokenizer else None
    groups = [replace(g, stack=stack, vocab=vocab) for g in groups]
    planned = _tensors(groups, donor, stack)
    check_filters(groups, [t.name for t in planned])
    tensors, shards = build.shard(planned, recipe.output.shard_limit)
    config = out_config(spec.slices, opened, donor)
    dropped = tuple(r.name for r in donor.index if build.DROPPED.search(r.name))
    others = tuple(o.index for m, o in opened.items() if m != recipe.base)
    notes = tuple(build.renamed(uses))
    plan = MergePlan(
        recipe, donor.index, None, stack, tensors, shards, config, dropped, notes, tuple(uses),
        others,
    )  # fmt: skip
    return with_tokenizer(plan, vocab)


def _open_all(
    recipe: Recipe, spec: MethodSpec
) -> tuple[dict[ModelSpec, _Opened], list[AdapterUse]]:
    """Each model's index, adapters' terms, layer stack and config; the recipe's base
    (or the config's donor) first."""
    opened: dict[ModelSpec, _Opened] = {}
    uses: list[AdapterUse] = []
    for model, role, index, config in each_model(recipe, spec):
        stack = find_stack(index.tensors, f"{role} {index.path}", recipe.layers_prefix)
        _one_stack(f"{role} {index.path}", stack, config)
        terms, more = build.lora_terms(role, model, index)
        uses += more
        opened[model] = _Opened(role, index, terms, stack, config)
    return opened, uses


def _one_stack(where: str, stack: LayerStack, config: dict[str, Any] | None) -> None:
    """Top-level slices cut one stack of decoder layers; a modular model's are sliced
    module by module (mergekit refuses them too)."""
    defs = modules_of(config)
    if defs is not None:
        raise RecipeError(
            f"{where}: {architecture(config)} has modules {', '.join(d.name for d in defs)}: "
            "slice them under modules: (as mergekit wants)"
        )
    if stack.towers or stack.prefix is None:
        raise InputError(
            f"{where}: slices need one stack of decoder layers, and it has "
            + (f"other stacks too ({', '.join(stack.towers)}), in an architecture lazymerge "
               "knows no modules: of" if stack.towers else "none")
        )  # fmt: skip


def _groups(
    recipe: Recipe, spec: MethodSpec, opened: dict[ModelSpec, _Opened]
) -> tuple[list[Group], int]:
    """One group per slice, its output layers after the previous slice's."""
    groups, start = [], 0
    for i, piece in enumerate(spec.slices):
        groups.append(_group(recipe, spec, opened, i, start))
        start += piece.length
    return groups, start


def _group(
    recipe: Recipe, spec: MethodSpec, opened: dict[ModelSpec, _Opened], i: int, start: int
) -> Group:
    """Slice `i` as a group: its base (its own, or the recipe's) first when among its
    sources, else its first source; each source shifted from output to its own layers."""
    piece = spec.slices[i]
    where = f"slices[{i}]"
    base = piece.base or (recipe.base if spec.has_base else None)
    order = sorted(range(len(piece.sources)), key=lambda j: piece.sources[j].model != base)
    top = (Level(f"{where}.parameters", piece.parameters), Level("parameters", spec.parameters))
    models = []
    for j in order:
        src = piece.sources[j]
        o = opened[src.model]
        _check_range(o, src.layers, f"{where}.sources[{j}]", opened[recipe.base])
        level = Level(f"{where}.sources[{j}].parameters", src.parameters)
        models.append(Model(o.role, o.index, o.terms, (level, *top), src.layers[0] - start))
    method = METHOD_PARAMS[spec.name]
    has_base = base is not None and piece.sources[order[0]].model == base
    span = (start, start + piece.length)
    inverse = tuple(order.index(j) for j in range(len(order)))
    stack = opened[recipe.base].stack
    return Group(recipe, spec, method, tuple(models), inverse, stack, top, span, has_base)


def _check_range(o: _Opened, layers: tuple[int, int], where: str, donor: _Opened) -> None:
    if o.stack.prefix != donor.stack.prefix:
        raise InputError(
            f"{where}: {o.index.path} keeps its layers in {o.stack.prefix}, "
            f"{donor.index.path} in {donor.stack.prefix}; slices stack layers of one kind"
        )
    if layers[1] > o.stack.count:
        raise RecipeError(
            f"{where}: layers [{layers[0]}, {layers[1]}) reach past {o.index.path}'s last "
            f"layer: it has {o.stack.count} (0..{o.stack.count - 1}); end the range at "
            f"{o.stack.count} at most"
        )


def _tensors(groups: Sequence[Group], donor: _Opened, stack: LayerStack) -> list[PlannedTensor]:
    """Every output tensor in the output's natural order: the donor's tensors outside the
    layers (before them from the first slice, after them from the last), each slice's."""
    first, last = groups[0], groups[-1]
    if len(last.models) > len(first.models):
        raise RecipeError(
            f"slices[{len(groups) - 1}] has more sources than slices[0]; mergekit merges the "
            "final norm and head from only as many of the last slice's sources as the first "
            "has: give the last slice no more sources than the first"
        )
    planned = []
    for ref in donor.index:
        if donor.stack.layer_of(ref.name) is None and not build.DROPPED.search(ref.name):
            before = natural_key(ref.name, stack)[0] == 0
            planned.append(plan_tensor(first if before else last, ref.name))
    for group in groups:
        planned += [plan_tensor(group, name) for name in layer_names(group)]
    return sorted(planned, key=lambda t: natural_key(t.name, stack))


def layer_names(group: Group) -> list[str]:
    """The output names of a slice's layers: its first input's tensors of each source
    layer, renumbered (the other inputs must have the same, checked as they are read)."""
    assert group.span is not None
    model, stack = group.models[0], group.stack
    names = []
    for ref in model.index:
        layer = stack.layer_of(ref.name)
        if layer is None or build.DROPPED.search(ref.name):
            continue
        out = layer - model.shift
        if group.span[0] <= out < group.span[1]:
            names.append(f"{stack.prefix}.{out}.{ref.name.split(f'.{layer}.', 1)[1]}")
    return names


def out_config(
    slices: Sequence[SliceSpec], opened: dict[ModelSpec, _Opened], donor: _Opened
) -> dict[str, Any] | None:
    """The donor's config.json with the output's layer count and each per-layer list
    following the output's layers (follow_layers)."""
    if donor.config is None:
        return None
    sources = [
        (opened[m].config, opened[m].stack.count, layer) for m, layer in source_layers(slices)
    ]
    where = f"{donor.index.path}/config.json"
    return follow_layers(donor.config, donor.stack.count, sources, LAYER_COUNT_KEYS, where)


def source_layers(slices: Sequence[SliceSpec]) -> list[tuple[ModelSpec, int]]:
    """Each output layer's source: the model and layer of its slice's first source
    (mergekit's choice for the layer's config)."""
    return [
        (s.sources[0].model, s.sources[0].layers[0] + o) for s in slices for o in range(s.length)
    ]


LayerSource = tuple[dict[str, Any] | None, int, int]  # a source's config, its layers, a layer


def follow_layers(
    config: dict[str, Any],
    n: int,
    sources: Sequence[LayerSource],
    keys: Sequence[str],
    where: str,
) -> dict[str, Any]:
    """`config` (config.json, or a module's sub-config of it, with `n` layers) for an
    output whose layer j comes from `sources[j]`: its layer count (under one of `keys`)
    and every per-layer list (a list as long as the donor has layers) taken, layer by
    layer, from the source model's own list where it has one (else the donor's)."""
    count = len(sources)
    out = dict(config)
    found = [k for k in keys if config.get(k) == n]
    if not found and count != n:
        raise InputError(
            f"{where}: no layer count ({', '.join(keys)}) says its {n} layers, so the "
            f"output's {count} could not be written there"
        )
    for k in found:
        out[k] = count
    for key, value in config.items():
        if isinstance(value, list) and len(value) == n and n > 1:
            out[key] = [_entry(own, theirs, config, key, layer) for own, theirs, layer in sources]
    _check_pattern(out, [layer for _, _, layer in sources], where)
    return out


def _entry(own: dict[str, Any] | None, n: int, donor: dict[str, Any], key: str, layer: int) -> Any:
    mine = (own or {}).get(key)
    if isinstance(mine, list) and len(mine) == n:
        return mine[layer]
    return donor[key][layer] if layer < len(donor[key]) else None


def _check_pattern(config: dict[str, Any], layers: Sequence[int], where: str) -> None:
    """A layer pattern only a count tells (every p-th layer global) must still hold for
    the renumbered layers, else the output's attention would change kind silently."""
    if "layer_types" in config:
        return
    for key in PATTERN_KEYS:
        p = config.get(key)
        if not isinstance(p, int) or isinstance(p, bool) or p < 2:
            continue
        for j, layer in enumerate(layers):
            if ((j + 1) % p == 0) != ((layer + 1) % p == 0):
                raise InputError(
                    f"{where}: {key} {p} would make output layer {j} (source layer {layer}) "
                    "another attention kind; add layer_types to the config (transformers "
                    "writes it) so each layer keeps its own"
                )
