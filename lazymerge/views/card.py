"""The model card (README.md) of a merge's output, with its blend picture; the output's
lifecycle (lazymerge.write.output) writes them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

import yaml

from lazymerge import __version__
from lazymerge.errors import LazyMergeError
from lazymerge.plan.model import MergePlan
from lazymerge.plan.modules import output_modules
from lazymerge.read.config import checkpoint_config
from lazymerge.views import nmodel
from lazymerge.views.plot import PictureJob, plot_blend
from lazymerge.views.report import human_bytes, ratio_table
from lazymerge.views.tokenizer import tokenizer_lines


class Picture(Protocol):
    def collect(self, dest: Path) -> bool:
        """Put the picture at `dest`; False when it could not be drawn."""
        ...


class DrawHere:
    """The picture drawn in this process when collected (the batch driver's way: it
    merges nothing itself, so matplotlib's memory costs it nothing)."""

    def __init__(self, plan: MergePlan, title: str) -> None:
        self.plan, self.title = plan, title

    def collect(self, dest: Path) -> bool:
        try:
            plot_blend(self.plan, dest, self.title)
        except LazyMergeError:  # matplotlib is optional; the card is not
            return False
        return True


def wants_picture(plan: MergePlan) -> bool:
    """A blend or an N-model merge gets a picture; LAZYMERGE_NO_PICTURE=1 skips it."""
    merges = plan.recipe.other is not None or plan.recipe.merge is not None
    return merges and not os.environ.get("LAZYMERGE_NO_PICTURE")


def start_picture(plan: MergePlan, title: str) -> PictureJob | None:
    """Start drawing the card's picture in a child process, while the merge runs."""
    return PictureJob(plan, title) if wants_picture(plan) else None


class ModelCard:
    """README.md with Hugging Face front matter, the recipe, the per-layer table, the
    picture (when matplotlib is installed) and how to reproduce the merge (implements
    lazymerge.write.output.Card)."""

    def __init__(self, plan: MergePlan, title: str, picture: Picture | None) -> None:
        self.plan, self.title, self._picture = plan, title, picture

    def picture(self, dest: Path) -> bool:
        return self._picture is not None and self._picture.collect(dest)

    def text(self, picture: str | None, out: Path | None = None) -> str:
        if self.plan.recipe.merge is not None:
            shown = f"![per-layer parameters: each model's weight share and density]({picture})\n\n"
        else:
            shown = f"![per-layer blend: base in blue, other in green]({picture})\n\n"
        return card_text(self.plan, self.title, shown if picture else "", out)


def drawn_here(plan: MergePlan, title: str) -> ModelCard:
    """The card of one merge of a batch, its picture drawn by the driver when collected."""
    return ModelCard(plan, title, DrawHere(plan, title) if wants_picture(plan) else None)


def card_text(plan: MergePlan, title: str, picture: str = "", out: Path | None = None) -> str:
    """README.md's text. Model paths in its recipe are relative to `out`, the output
    directory (absolute without it), so the card names no one's home directory."""
    recipe = plan.recipe
    parts = [
        "---\n" + yaml.safe_dump(_front(plan), sort_keys=False) + "---\n",
        f"# {title}\n",
        _description(plan) if recipe.merge is None else _merge_description(plan),
        _layers(plan, picture),
        "## Recipe\n",
        "Paths are relative to this directory.\n" if out is not None else "",
        "```yaml\n" + yaml.safe_dump(_relative(recipe.to_dict(), out), sort_keys=False) + "```\n",
        "## Reproduce\n",
        f"Install lazymerge {__version__} from its source (it is not on PyPI), save the "
        "recipe above as `recipe.yaml` in this directory and, with the inputs at its paths, "
        "run:\n\n"
        f"```sh\npip install .    # in a checkout of lazymerge {__version__}'s source\n"
        f"lazymerge merge recipe.yaml -o ../{out.name if out is not None else title}-again"
        "    # in this directory\n```\n\n"
        "`lazymerge.json` next to this card lists every input file's size and header hash and "
        "every output shard's sha256; the same inputs give the same bytes.\n",
    ]
    return "\n".join(p for p in parts if p)


def _front(plan: MergePlan) -> dict[str, Any]:
    """The Hub's front matter: every model's Hub id (base_model), tags, library."""
    models = plan.recipe.models()  # the founding recipe's: base, other
    hub_ids = [i for m in models for i in hub_ids_of(m.path)]
    front: dict[str, Any] = {"base_model": list(dict.fromkeys(hub_ids))} if hub_ids else {}
    method = [plan.recipe.merge.name] if plan.recipe.merge is not None else []
    loras = ["lora"] if any(m.loras for m in models) else []
    return front | {"tags": ["merge", "lazymerge", *method, *loras], "library_name": "transformers"}


def _layers(plan: MergePlan, picture: str) -> str:
    """The per-layer section: the founding blend's ratios, an N-model merge's parameters."""
    if plan.recipe.merge is not None:
        table = "\n".join(nmodel.method_table(plan))
        return f"## Per-layer parameters\n\n{picture}```\n{table}\n```\n"
    if plan.recipe.other is None:
        return ""
    return picture + "## Per-layer blend\n\n```\n" + "\n".join(ratio_table(plan)) + "\n```\n"


# A Hugging Face Hub repository id: "owner/name", letters, digits, '-', '_', '.'.
HUB_ID = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
)


def hub_ids_of(model: Path) -> list[str]:
    """The Hub id a model directory's own metadata gives it: `_name_or_path` in its
    config.json. A local path says nothing a Hub reader can use: none then (never an id
    made up from a folder name). Its README's `base_model` is not used: that names the
    model it was made from, not the model itself."""
    try:
        config = checkpoint_config(model) or {}
    except LazyMergeError:
        config = {}
    named = config.get("_name_or_path")
    return [named] if isinstance(named, str) and _is_hub_id(named) else []


def _is_hub_id(name: str) -> bool:
    return (
        HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and "--" not in name
        and len(name) <= 96
        and not Path(name).exists()  # a relative local path that looks like one
    )


def _relative(data: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """The recipe's model and adapter paths relative to `out` (recipe.to_dict's form)."""
    if out is None:
        return data

    def rel(path: str) -> str:
        return os.path.relpath(path, out)

    def model(m: dict[str, Any]) -> dict[str, Any]:
        loras = [{**lo, "path": rel(lo["path"])} for lo in m["loras"]]
        return {**m, "model": rel(m["model"]), "loras": loras}

    def entry(k: str, v: Any) -> Any:
        if k in ("base", "other"):
            return model(v)
        if k == "modules":  # each module's models, or its slices' sources and bases
            return {name: {key: entry(key, x) for key, x in m.items()} for name, m in v.items()}
        if k == "slices":
            return [{key: entry(key, x) for key, x in s.items()} for s in v]
        return [model(m) for m in v] if k in ("models", "sources") else v

    return {k: entry(k, v) for k, v in data.items()}


def _description(plan: MergePlan) -> str:
    recipe = plan.recipe
    lines = [f"A merge made with lazymerge {__version__}:\n"]
    for role, model in (("base", recipe.base), ("other", recipe.other)):
        if model is None:
            continue
        lines.append(f"- **{role}**: `{model.path.name}`")
        lines += [f"  - LoRA `{lo.path.name}` at weight {lo.weight:g}" for lo in model.loras]
    if recipe.other:
        lines.append(
            "\nEach tensor is `(1 - r) * base' + r * other'` (': with its LoRAs), r from the "
            "per-layer table below, in float32 with one rounding."
        )
    lines.append(
        f"\n{len(plan.tensors)} tensors, {human_bytes(plan.bytes_to_write)} in {len(plan.shards)} shard(s).\n"
    )
    return "\n".join(lines)


def _how(method: str, sliced: bool, modules: bool = False) -> str:
    if modules:
        return (
            f"The output is merged module by module, each module's tensors computed by "
            f"`{method}` from its slices' or models' (each with its LoRAs applied), a "
            "gradient running over the module's own layers; the table below gives each "
            "module's layers:"
        )
    if sliced:
        return (
            f"The output's layers are the slices' in order, each computed by `{method}` from "
            "its sources' layers (each with its LoRAs applied); the table below says which:"
        )
    return (
        f"Each tensor is computed by `{method}` from the base's tensor and every model's "
        "(each with its LoRAs applied), with each model's parameters for that tensor's layer "
        "in the table below."
    )


def _merge_description(plan: MergePlan) -> str:
    """An N-model merge: the method, where its precision comes from, every model with
    its LoRAs."""
    spec = plan.recipe.merge
    assert spec is not None
    names = nmodel.labels(plan)
    entries = [(nmodel.roles(plan)[0], plan.recipe.base)]
    entries += [(f"models[{i}]", e.model) for i, e in enumerate(spec.models) if i != spec.base_at]
    lines = [f"A merge made with lazymerge {__version__}:\n"]
    lines.append(f"- **method**: {nmodel.headline(plan).removeprefix('method: ')}")
    for role, model in entries:
        lines.append(f"- **{role}**: `{names[role]}`")
        lines += [f"  - LoRA `{lo.path.name}` at weight {lo.weight:g}" for lo in model.loras]
    by_modules = output_modules(plan) is not None
    lines.append("\n" + _how(spec.name, bool(spec.slices), by_modules))
    lines += [f"- {line}" for line in nmodel.slice_map(plan)]
    told = tokenizer_lines(plan)
    if told:
        lines.append("\nThe tokenizer and the vocabulary rows:\n")
        lines += [f"- {line.strip()}" for line in told]
    lines.append(
        f"\n{len(plan.tensors)} tensors, {human_bytes(plan.bytes_to_write)} in {len(plan.shards)} shard(s).\n"
    )
    return "\n".join(lines)
