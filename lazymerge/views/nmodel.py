"""An N-model merge as `plan`, the card and the manifest show it: the method, where its
precision comes from, and each model's parameters layer by layer (a gradient or a filter
makes them differ), with the passes each tensor takes over its inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lazymerge.meaning.layers import LayerStack
from lazymerge.meaning.methods.base import Scalar
from lazymerge.meaning.modules import Module
from lazymerge.plan.model import MergePlan, PlannedTensor
from lazymerge.plan.modules import output_modules
from lazymerge.recipe.spec import DTYPE_LABELS, ModelSpec, Parameters, Setting, SliceSpec

_ABBREV = {"weight": "w", "density": "d", "gamma": "g", "epsilon": "e"}


def headline(plan: MergePlan) -> str:
    spec = plan.recipe.merge
    assert spec is not None
    if spec.compute is None:
        precision = "float32 arithmetic, one rounding"
    elif spec.compute == "inputs":
        precision = "in the inputs' dtype (mergekit without dtype)"
    else:
        precision = f"in {DTYPE_LABELS.get(spec.compute, spec.compute.lower())} (mergekit's dtype)"
    syntax = " (mergekit config)" if spec.source == "mergekit" else ""
    seed = f", seed {spec.seed}" if spec.name.startswith(("dare", "della")) else ""
    return f"method: {spec.name}{syntax}, {precision}{seed}"


def models(plan: MergePlan) -> list[str]:
    spec = plan.recipe.merge
    assert spec is not None
    first = roles(plan)[0]
    lines = [f"{first}: {plan.base.path} ({plan.base.note or plan.base.format})"]
    others = iter(plan.models)
    for i in range(len(spec.models)):
        if i != spec.base_at:
            index = next(others)
            lines.append(f"models[{i}]: {index.path} ({index.note or index.format})")
    return lines


def slice_map(plan: MergePlan) -> list[str]:
    """Layer surgery: which source layers each run of output layers comes from; by
    modules, each module's (module_map)."""
    spec = plan.recipe.merge
    if spec is None:
        return []
    found = output_modules(plan)
    if found is not None:
        return module_map(plan, found)
    return _slice_lines(plan, spec.slices, "")


def _slice_lines(plan: MergePlan, slices: tuple[SliceSpec, ...], where: str) -> list[str]:
    spec = plan.recipe.merge
    assert spec is not None
    names = labels(plan)
    lines, start = [], 0
    for i, piece in enumerate(slices):
        end = start + piece.length - 1
        froms = [
            f"{names[_role(plan, src.model)]} {_span(src.layers[0], src.layers[1] - 1)}"
            for src in piece.sources
        ]
        how = f"{spec.name} of " if len(froms) > 1 else ""
        lines.append(f"{where}slices[{i}]: layers {_span(start, end)} <- {how}{', '.join(froms)}")
        start = end + 1
    return lines


def module_map(plan: MergePlan, found: dict[str, Module]) -> list[str]:
    """A merge by modules: each module's slices, or its models over all its layers, and
    its parameters; a plain models: merge: the modules each merges the models over."""
    spec = plan.recipe.merge
    assert spec is not None
    if not spec.modules:
        each = ", ".join(f"{n} {_layers(m)}" for n, m in found.items())
        return [f"by modules: {each}; each merges the models over its own layers (as mergekit)"]
    names = labels(plan)
    lines = []
    for mod in spec.modules:
        where = f"modules.{mod.name}."
        if mod.slices:
            lines += _slice_lines(plan, mod.slices, where)
        else:
            froms = [names[_role(plan, e.model)] for e in mod.models]
            if spec.has_base and all(e.model != plan.recipe.base for e in mod.models):
                froms.append(f"{names[roles(plan)[0]]} (the base)")
            how = f"{spec.name} of " if len(froms) > 1 else ""
            lines.append(f"{where}models: {_layers(found[mod.name])} <- {how}{', '.join(froms)}")
        if mod.parameters:
            lines.append(f"{where}parameters: {_settings(mod.parameters)}")
    return lines


def _layers(module: Module) -> str:
    n = module.stack.count
    return f"layers {_span(0, n - 1)}" if n else "no layers"


def _settings(parameters: Parameters) -> str:
    """A `parameters:` mapping, compactly: `weight 0.25, t [0.2, 0.8] (mlp: 0.5; 0.1)`."""

    def value(v: tuple[Scalar, ...]) -> str:
        return _fmt(v[0]) if len(v) == 1 else "[" + ", ".join(_fmt(x) for x in v) + "]"

    def setting(s: Setting) -> str:
        if len(s) == 1 and s[0].filter is None:
            return value(s[0].value)
        return (
            "("
            + "; ".join(f"{c.filter}: " * (c.filter is not None) + value(c.value) for c in s)
            + ")"
        )

    return ", ".join(f"{k} {setting(v)}" for k, v in parameters.items())


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _role(plan: MergePlan, model: ModelSpec) -> str:
    spec = plan.recipe.merge
    assert spec is not None
    if model == plan.recipe.base:
        return roles(plan)[0]
    return f"models[{next(i for i, e in enumerate(spec.models) if e.model == model)}]"


def _params(t: PlannedTensor) -> list[str]:
    """Per input, its parameters on this tensor (shared ones first), compactly."""
    call = t.call
    if call is None:
        return []
    shared = " ".join(f"{k}={_fmt(v)}" for k, v in call.shared.items())
    cells = [shared]
    for params in call.per_input:
        cells.append(" ".join(f"{_ABBREV.get(k, k)} {_fmt(v)}" for k, v in params.items()) or "-")
    return cells


def _fmt(v: Scalar) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:.4g}"


def _passes(t: PlannedTensor) -> int:
    return 1 + (t.method.stat_passes() if t.method is not None else 0)


def roles(plan: MergePlan) -> list[str]:
    """The inputs' roles, the base first, then the models in the recipe's order."""
    spec = plan.recipe.merge
    assert spec is not None
    first = ["base"] if spec.has_base or spec.base_at is None else [f"models[{spec.base_at}]"]
    return first + [f"models[{i}]" for i in range(len(spec.models)) if i != spec.base_at]


Row = tuple[str, int | None]  # (module, layer): a row of the per-layer table


def _rows_of(plan: MergePlan) -> tuple[dict[str, LayerStack], Callable[[str], Row]]:
    """The table's row of each tensor: its layer (None: outside the layers); for a merge
    by modules, its module's layer. And each module's output layers ("": the decoder's)."""
    found = output_modules(plan)
    if found is None:
        return {"": plan.stack}, lambda name: ("", plan.stack.layer_of(name))
    owner = {n: module for module, m in found.items() for n in m.names}
    stacks = {module: m.stack for module, m in found.items()}
    return stacks, lambda name: (owner[name], stacks[owner[name]].layer_of(name))


def _layer_cells(plan: MergePlan) -> tuple[dict[Row, dict[str, set[str]]], list[Row]]:
    """Per row, each column's distinct values; the rows in order (module by module, each
    one's layers, then its rest)."""
    cells: dict[Row, dict[str, set[str]]] = {}
    spec = plan.recipe.merge
    sliced = bool(spec and (spec.slices or any(m.slices for m in spec.modules)))
    stacks, row_of = _rows_of(plan)
    for t in plan.tensors:
        if t.call is None:  # an integer buffer: the base's, as it is
            continue
        module, layer = row_of(t.name)
        row = cells.setdefault((module, layer), {})
        shared, *mine = _params(t)
        values = {"shared": shared, "passes": str(_passes(t))}
        values |= {i.role: v for i, v in zip(t.inputs, mine, strict=True)}
        if sliced and layer is not None:
            values["from"] = " ".join(
                f"{i.role}:{stacks[module].layer_of(i.ref.name)}" for i in t.inputs
            )
        for col, v in values.items():
            row.setdefault(col, set()).add(v)
    order = list(stacks)
    return cells, sorted(cells, key=lambda r: (order.index(r[0]), r[1] is None, r[1] or 0))


def _row_label(row: Row) -> str:
    module, layer = row
    text = "rest" if layer is None else str(layer)
    return f"{module} {text}" if module else text


def method_table(plan: MergePlan) -> list[str]:
    """One line per decoder layer (then `rest`) -- by modules, per module -- where a
    slice takes it from, each input's parameters, the passes."""
    rows, keys = _layer_cells(plan)
    sliced = any("from" in r for r in rows.values())
    head = [*(["from"] if sliced else []), "shared", *roles(plan), "passes"]
    table = [
        [_row_label(k), *(" | ".join(sorted(rows[k].get(h, {"-"}))) for h in head)] for k in keys
    ]
    widths = [max(len(h), *(len(r[c + 1]) for r in table)) for c, h in enumerate(head)]
    first = max([5, *(len(r[0]) for r in table)])
    # one decoder: layer numbers right-aligned; by modules: "vision_tower 2", left-aligned
    label = (lambda x: f"{x:>5}") if first == 5 else (lambda x: x.ljust(first))
    lines = [
        (
            "layer".ljust(first)
            + "  "
            + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
        ).rstrip()
    ]
    for r in table:
        cells = "  ".join(v.ljust(w) for v, w in zip(r[1:], widths, strict=True))
        lines.append(f"{label(r[0])}  {cells}".rstrip())
    return lines


# --- the picture's rows: each model's share per layer ----------------------------------


@dataclass(frozen=True)
class ShareRow:
    """One decoder layer of an N-model merge (layer None: the tensors outside them), as
    the picture draws it; models by their labels (`labels`)."""

    layer: int | None
    shares: dict[str, float]  # each weighted model's weight / the layer's total |weight|
    densities: dict[str, float]  # each model's density (the fraction of its task vector kept)
    topk: float | None  # sce's select_topk
    t: float | None = None  # slerp's, nearswap's t
    # layer surgery: where the layer comes from, (model label, its layer) per source
    sources: list[tuple[str, int]] | None = None


def labels(plan: MergePlan) -> dict[str, str]:
    """Each input's role -> the name people know it by: its directory's (a Hub cache
    snapshot's: the repository's), the role added where two would read the same."""
    spec = plan.recipe.merge
    assert spec is not None
    paths = {roles(plan)[0]: plan.base.path}
    paths |= {f"models[{i}]": e.model.path for i, e in enumerate(spec.models) if i != spec.base_at}
    names = {role: _dir_name(path) for role, path in paths.items()}
    seen = list(names.values())
    return {r: n if seen.count(n) == 1 else f"{n} ({r})" for r, n in names.items()}


def _dir_name(path: Path) -> str:
    # models--owner--name/snapshots/<commit>: the commit says nothing to a reader
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--", 2)[-1]
    return path.name


def share_rows(plan: MergePlan) -> list[ShareRow]:
    """Per decoder layer (then `rest`), each model's parameters averaged over the layer's
    computed tensors (a filter can make them differ), its weight as a share."""
    names = labels(plan)
    groups: dict[int | None, list[PlannedTensor]] = {}
    for t in plan.tensors:
        if t.call is not None:
            groups.setdefault(plan.stack.layer_of(t.name), []).append(t)
    keys = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
    sliced = plan.recipe.merge is not None and bool(plan.recipe.merge.slices)
    stack = plan.stack if sliced else None
    return [_share_row(k, groups[k], names, stack) for k in keys]


def _share_row(
    layer: int | None, tensors: list[PlannedTensor], names: dict[str, str], stack: LayerStack | None
) -> ShareRow:
    def mean(key: str, role: str | None) -> float | None:
        values = [float(v) for t in tensors if (v := _param(t, key, role)) is not None]
        return sum(values) / len(values) if values else None

    roles = [i.role for i in tensors[0].inputs]
    weights = {names[r]: w for r in roles if (w := mean("weight", r)) is not None}
    total = sum(abs(w) for w in weights.values())
    shares = {n: (w / total if total else 0.0) for n, w in weights.items()}
    densities = {names[r]: d for r in roles if (d := mean("density", r)) is not None}
    sources = None
    if layer is not None and stack is not None:
        sources = [(names[i.role], stack.layer_of(i.ref.name) or 0) for i in tensors[0].inputs]
    return ShareRow(layer, shares, densities, mean("select_topk", None), mean("t", None), sources)


def _param(t: PlannedTensor, key: str, role: str | None) -> Scalar | None:
    """A tensor's value of `key`: the shared one (role None) or input `role`'s."""
    assert t.call is not None
    if role is None:
        return t.call.shared.get(key)
    k = next((k for k, i in enumerate(t.inputs) if i.role == role), None)
    return None if k is None else t.call.per_input[k].get(key)
