"""The plan of a merge of a modular architecture (meaning/modules.py: a vision-language
model's text decoder, vision tower and projector), module by module, as mergekit plans a
`modules:` config -- and a plain `models:` merge of such a model, which mergekit reads as
every module merging those models over its own layers.

Each module is merged as a `slices:` merge of its own layers is (plan/slices.py): one
Group per slice (a `models:` module: one slice over all its layers), the module's output
layers numbered from 0, a gradient's position t running over the slice -- so a vision
tower's layers have their own t, as in mergekit -- and the module's tensors outside its
layers from its first slice's sources (before the layers) or its last's (after them:
ModuleDef.post), at t = 0. A parameter is looked up in the source's, the slice's, the
module's, then the recipe's `parameters`.

The output keeps the inputs' names. Its config.json is the donor's with each module's
layer count (`text_config.num_hidden_layers`...) and per-layer lists
(`text_config.layer_types`) following that module's output layers. mergekit 0.1.5 writes
only the counts, so its Gemma 3 with more or fewer text layers than the donor does not
load in transformers 5 (layer_types no longer as long as the layers); this one does.

Refused, in one line, before anything is written: a module the architecture lacks, a
module no input holds, a layer range past a module's layers, a tensor no module claims,
and a module the recipe leaves out. mergekit drops a left-out module's tensors and the
output loads with them randomly initialised (a projector, say), silently; copying them
from the base instead would be a rule of lazymerge's own that a mergekit config cannot
say. So the recipe names every module, and the error says how (`models:` with one
model copies that model's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.layers import DECODER_STACKS, LayerStack, natural_key
from lazymerge.meaning.modules import (
    MODULES,
    Module,
    ModuleDef,
    architecture,
    modules_of,
    split,
)
from lazymerge.meaning.order import order_of
from lazymerge.meaning.params import Level
from lazymerge.plan import build
from lazymerge.plan.model import AdapterUse, MergePlan, PlannedTensor
from lazymerge.plan.nmodel import Group, Model, check_filters, each_model, plan_tensor
from lazymerge.plan.slices import follow_layers, layer_names, source_layers
from lazymerge.plan.vocab import VocabPlan, plan_vocab, with_tokenizer
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.config import checkpoint_config
from lazymerge.recipe.methods import METHOD_PARAMS
from lazymerge.recipe.spec import (
    MergeInput,
    MethodSpec,
    ModelSpec,
    Parameters,
    Recipe,
    SliceSource,
    SliceSpec,
)


@dataclass(frozen=True)
class _Opened:
    """One model of the recipe, opened once, its tensors split into modules."""

    role: str
    index: CheckpointIndex
    terms: build.Terms
    config: dict[str, Any] | None
    modules: dict[str, Module]


@dataclass(frozen=True)
class Part:
    """One module as the plan merges it: its slices (a `models:` module's one slice over
    all its layers), its parameters, and where the recipe writes them."""

    module: ModuleDef
    slices: tuple[SliceSpec, ...]
    parameters: Parameters
    where: str  # "modules.vision_tower."; "" for a plain models: merge
    listed: int = 0  # given as models: how many entries (the base may join after them)

    def source_where(self, i: int, j: int) -> str:
        if not self.listed:
            return f"{self.where}slices[{i}].sources[{j}]"
        return f"{self.where}models[{j}]" if j < self.listed else f"{self.where}models (the base)"

    def levels(self, i: int, top: Parameters) -> tuple[Level, ...]:
        """Slice `i`'s levels above its sources': the slice's, the module's, the recipe's."""
        own = f"{self.where}slices[{i}].parameters"
        levels = [] if self.listed else [Level(own, self.slices[i].parameters)]
        if self.where:
            levels.append(Level(f"{self.where}parameters", self.parameters))
        return (*levels, Level("parameters", top))


def by_modules(recipe: Recipe) -> bool:
    """Whether an N-model merge is planned here: a `modules:` recipe, or `models:` on an
    architecture with modules (mergekit reads it as every module merging the models)
    unless the recipe names its decoder stack itself (`layers_prefix`)."""
    spec = recipe.merge
    if spec is None or spec.slices or spec.modules or recipe.layers_prefix is not None:
        return spec is not None and bool(spec.modules)
    return modules_of(checkpoint_config(recipe.base.path)) is not None


def output_modules(plan: MergePlan) -> dict[str, Module] | None:
    """A plan made here: each module's output tensors and layers, in the recipe's order
    of modules (a plain models: merge: the architecture's); None: a plan made elsewhere."""
    spec, defs = plan.recipe.merge, modules_of(plan.config)
    if spec is None or spec.slices or defs is None or plan.recipe.output.format == "gguf":
        return None
    if not spec.modules and plan.recipe.layers_prefix is not None:
        return None
    found = split([t.name for t in plan.tensors], defs, "the output")
    order = [m.name for m in spec.modules] or [d.name for d in defs]
    return {name: found[name] for name in order if found[name].names}


def build_module_plan(recipe: Recipe) -> MergePlan:
    """Open every model's headers and decide every output tensor, module by module."""
    spec = recipe.merge
    assert spec is not None
    opened, uses = _open_all(recipe, spec)
    donor = opened[recipe.base]
    parts = _parts(recipe, spec, opened, donor)
    vocab = plan_vocab(recipe.tokenizer, recipe.models()) if recipe.tokenizer else None
    groups, planned, counts = _plan_parts(recipe, parts, opened, vocab)
    stack = _decoder(donor, counts)
    planned.sort(key=lambda t: natural_key(t.name, stack))
    check_filters(groups, [t.name for t in planned])
    tensors, shards = build.shard(planned, recipe.output.shard_limit)
    dropped = tuple(r.name for r in donor.index if build.DROPPED.search(r.name))
    others = tuple(o.index for m, o in opened.items() if m != recipe.base)
    plan = MergePlan(
        recipe, donor.index, None, stack, tensors, shards, _config(parts, opened, donor),
        dropped, tuple(build.renamed(uses)), tuple(uses), others,
    )  # fmt: skip
    return with_tokenizer(plan, vocab)


def _open_all(
    recipe: Recipe, spec: MethodSpec
) -> tuple[dict[ModelSpec, _Opened], list[AdapterUse]]:
    """Each model's index, adapters' terms, config and modules; the base (or the
    config's donor) first, whose architecture decides the modules."""
    opened: dict[ModelSpec, _Opened] = {}
    uses: list[AdapterUse] = []
    defs = None
    for model, role, index, config in each_model(recipe, spec):
        defs = defs or _architecture(f"{role} {index.path}", config)
        if "architectures" in (config or {}) and modules_of(config) != defs:
            raise InputError(
                f"{role} {index.path} is a {architecture(config)}, {recipe.base.path} a "
                f"{architecture(opened[recipe.base].config)}; a merge by modules takes one "
                "architecture"
            )
        terms, more = build.lora_terms(role, model, index)
        uses += more
        split_up = split(index.tensors, defs, f"{role} {index.path}")
        opened[model] = _Opened(role, index, terms, config, split_up)
    return opened, uses


def _architecture(where: str, config: dict[str, Any] | None) -> tuple[ModuleDef, ...]:
    defs = modules_of(config)
    if defs is None:
        raise RecipeError(
            f"modules: {where} is a {architecture(config)}, not an architecture lazymerge "
            f"knows modules of ({', '.join(MODULES)}); merge it with models: or slices:"
        )
    return defs


def _parts(
    recipe: Recipe, spec: MethodSpec, opened: dict[ModelSpec, _Opened], donor: _Opened
) -> list[Part]:
    """The recipe's modules, checked against the donor's architecture; a plain models:
    merge's: every module the donor holds, each merging the models."""
    known = {m.spec.name: m for m in donor.modules.values()}
    if not spec.modules:
        held = [m.spec for m in known.values() if m.names]
        return [_listed(d, spec.models, "", recipe, opened) for d in held]
    arch = f"{donor.index.path} ({architecture(donor.config)})"
    for mod in spec.modules:
        if mod.name not in known:
            raise RecipeError(
                f"modules.{mod.name}: {arch} has no module {mod.name}; its modules: "
                + ", ".join(known)
            )
    given = {mod.name for mod in spec.modules}
    omitted = [name for name, m in known.items() if m.names and name not in given]
    if omitted:
        n = len(known[omitted[0]].names)
        raise RecipeError(
            f"modules: {omitted[0]} is missing: {arch} has it ({n} tensors) and mergekit "
            f"would leave it out of the output; merge it too, e.g. {omitted[0]}: "
            f"{{models: [{{model: {recipe.base.path}}}]}} keeps that model's"
        )
    return [
        Part(known[m.name].spec, m.slices, m.parameters, f"modules.{m.name}.")
        if m.slices
        else replace(
            _listed(known[m.name].spec, m.models, f"modules.{m.name}.", recipe, opened),
            parameters=m.parameters,
        )
        for m in spec.modules
    ]


def _listed(
    d: ModuleDef,
    inputs: tuple[MergeInput, ...],
    where: str,
    recipe: Recipe,
    opened: dict[ModelSpec, _Opened],
) -> Part:
    """A `models:` module as mergekit reads it: one slice over all its layers, each model
    a source with its parameters, the base joining last when the models leave it out."""
    entries = [(e.model, e.parameters) for e in inputs]
    assert recipe.merge is not None
    if recipe.merge.has_base and all(m != recipe.base for m, _ in entries):
        entries.append((recipe.base, {}))
    for j, (model, _) in enumerate(entries):
        _holds(opened[model], d, f"{where}models[{j}]" if j < len(inputs) else where + "models")
    counts = [opened[m].modules[d.name].stack.count for m, _ in entries]
    for (model, _), n in zip(entries, counts, strict=True):
        if n != counts[0]:
            raise InputError(
                f"{where}models: {d.name} has {counts[0]} layers in {entries[0][0].path} but "
                f"{n} in {model.path}; merging it by models: takes models of one shape"
            )
    sources = tuple(SliceSource(m, (0, counts[0]), p) for m, p in entries)
    return Part(d, (SliceSpec(sources),), {}, where, len(inputs))


def _plan_parts(
    recipe: Recipe, parts: list[Part], opened: dict[ModelSpec, _Opened], vocab: VocabPlan | None
) -> tuple[list[Group], list[PlannedTensor], dict[str, int]]:
    """Every module's groups and tensors, and its output layer count."""
    donor = opened[recipe.base]
    groups: list[Group] = []
    planned: list[PlannedTensor] = []
    counts: dict[str, int] = {}
    for part in parts:
        name = part.module.name
        mine, start = [], 0
        for i, piece in enumerate(part.slices):
            mine.append(_group(recipe, opened, part, i, start))
            start += piece.length
        out = LayerStack(donor.modules[name].stack.prefix, start)
        mine = [replace(g, stack=out, vocab=vocab) for g in mine]
        planned += _tensors(part, mine, donor.modules[name])
        groups += mine
        counts[name] = start
    return groups, planned, counts


def _group(
    recipe: Recipe, opened: dict[ModelSpec, _Opened], part: Part, i: int, start: int
) -> Group:
    """Slice `i` of a module as a group: its base (its own, or the recipe's) first when
    among its sources, else its first source; each source shifted to its own layers."""
    spec = recipe.merge
    assert spec is not None
    piece = part.slices[i]
    base = piece.base or (recipe.base if spec.has_base else None)
    order = sorted(range(len(piece.sources)), key=lambda j: piece.sources[j].model != base)
    top = part.levels(i, spec.parameters)
    models = []
    for j in order:
        src = piece.sources[j]
        o = opened[src.model]
        where = part.source_where(i, j)
        _check_source(o, part.module, src.layers, where, opened[recipe.base])
        level = Level(f"{where}.parameters", src.parameters)
        models.append(Model(o.role, o.index, o.terms, (level, *top), src.layers[0] - start))
    has_base = base is not None and piece.sources[order[0]].model == base
    span = (start, start + piece.length)
    inverse = tuple(order.index(j) for j in range(len(order)))
    stack = opened[recipe.base].modules[part.module.name].stack
    method = METHOD_PARAMS[spec.name]
    return Group(recipe, spec, method, tuple(models), inverse, stack, top, span, has_base)


def _check_source(
    o: _Opened, d: ModuleDef, layers: tuple[int, int], where: str, donor: _Opened
) -> None:
    """The source holds the module, in the donor's layout, with the layers asked for."""
    _holds(o, d, where)
    mine, theirs = o.modules[d.name], donor.modules[d.name]
    if mine.stack.prefix != theirs.stack.prefix:
        raise InputError(
            f"{where}: {o.index.path} keeps {d.name}'s layers in {mine.stack.prefix}, "
            f"{donor.index.path} in {theirs.stack.prefix}; merge checkpoints of one layout"
        )
    n = mine.stack.count
    if layers[1] > n:
        has = f"{n} layers (0..{n - 1}); end the range at {n} at most" if n else "no layers"
        raise RecipeError(
            f"{where}: layers [{layers[0]}, {layers[1]}) reach past {o.index.path}'s "
            f"{d.name}: it has {has}"
        )


def _holds(o: _Opened, d: ModuleDef, where: str) -> None:
    if not o.modules[d.name].names:
        raise InputError(
            f"{where}: {o.index.path} has no {d.name} (no tensor under {' or '.join(d.prefixes)})"
        )


def _tensors(part: Part, groups: list[Group], module: Module) -> list[PlannedTensor]:
    """A module's tensors: those outside its layers (before them from the first slice,
    after them from the last), then each slice's layers."""
    first, last = groups[0], groups[-1]
    if len(last.models) > len(first.models):
        raise RecipeError(
            f"{part.where}slices[{len(groups) - 1}] has more sources than {part.where}slices[0]; "
            f"mergekit merges {part.module.name}'s tensors after its layers from only as many "
            "of the last slice's sources as the first has: give the last no more than the first"
        )
    planned = [
        plan_tensor(last if module.is_post(name) else first, name)
        for name in module.names
        if module.stack.layer_of(name) is None and not build.DROPPED.search(name)
    ]
    for group in groups:
        planned += [plan_tensor(group, name) for name in layer_names(group)]
    return planned


def _decoder(donor: _Opened, counts: dict[str, int]) -> LayerStack:
    """The output's decoder layers (the module whose stack is a known decoder stack), the
    other modules' layers named as towers, the family's natural order."""
    stacks = {m.spec.name: m.stack.prefix for m in donor.modules.values() if m.stack.prefix}
    text = next((n for n, p in stacks.items() if p in DECODER_STACKS), None)
    towers = tuple(sorted(p for n, p in stacks.items() if n != text))
    prefix = stacks[text] if text is not None else None
    count = counts.get(text, 0) if text is not None else 0
    return LayerStack(prefix, count, towers, order_of(donor.config))


def _config(
    parts: list[Part], opened: dict[ModelSpec, _Opened], donor: _Opened
) -> dict[str, Any] | None:
    """The donor's config.json, each module's sub-config (where its count_key points)
    following that module's output layers (plan/slices.py follow_layers)."""
    if donor.config is None:
        return None
    config = donor.config
    for part in parts:
        key, name = part.module.count_key, part.module.name
        if key is None:
            continue
        *path, leaf = key.split(".")
        sub, n = _at(donor.config, path), donor.modules[name].stack.count
        sources = [
            (_at(opened[m].config, path), opened[m].modules[name].stack.count, layer)
            for m, layer in source_layers(part.slices)
        ]
        where = f"{donor.index.path}/config.json" + (f" {'.'.join(path)}" if path else "")
        if sub is None and len(sources) != n:
            raise InputError(f"{where}: not found, so {name}'s layer count has nowhere to go")
        if sub is not None:
            config = _put(config, path, follow_layers(sub, n, sources, (leaf,), where))
    return config


def _at(config: dict[str, Any] | None, path: list[str]) -> dict[str, Any] | None:
    """The sub-config at `path` (text_config...), or None."""
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else None


def _put(config: dict[str, Any], path: list[str], sub: dict[str, Any]) -> dict[str, Any]:
    """`config` with `sub` at `path`, the dicts on the way copied (the donor's unchanged)."""
    if not path:
        return sub
    return {**config, path[0]: _put(config[path[0]], path[1:], sub)}
