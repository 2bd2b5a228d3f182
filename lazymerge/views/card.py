"""The model card (README.md) of a merge's output, with its blend picture; the output's
lifecycle (lazymerge.write.output) writes them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import yaml

from lazymerge import __version__
from lazymerge.errors import LazyMergeError
from lazymerge.plan.model import MergePlan
from lazymerge.views.plot import PictureJob, plot_blend
from lazymerge.views.report import human_bytes, ratio_table


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
    """A blend gets a picture; LAZYMERGE_NO_PICTURE=1 skips it."""
    return plan.recipe.other is not None and not os.environ.get("LAZYMERGE_NO_PICTURE")


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

    def text(self, picture: str | None) -> str:
        shown = f"![per-layer blend: base in blue, other in green]({picture})\n\n"
        return card_text(self.plan, self.title, shown if picture else "")


def drawn_here(plan: MergePlan, title: str) -> ModelCard:
    """The card of one merge of a batch, its picture drawn by the driver when collected."""
    return ModelCard(plan, title, DrawHere(plan, title) if wants_picture(plan) else None)


def card_text(plan: MergePlan, title: str, picture: str = "") -> str:
    recipe = plan.recipe
    models = [recipe.base] + ([recipe.other] if recipe.other else [])
    loras = [lo for m in models for lo in m.loras]
    front = {
        "base_model": [m.path.name for m in models],
        "tags": ["merge", "lazymerge"] + (["lora"] if loras else []),
        "library_name": "transformers",
    }
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
        f"# {title}\n",
        _description(plan),
        picture + "## Per-layer blend\n\n```\n" + "\n".join(ratio_table(plan)) + "\n```\n"
        if recipe.other
        else "",
        "## Recipe\n",
        "```yaml\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False) + "```\n",
        "## Reproduce\n",
        "With the inputs at the paths above, save the recipe as `recipe.yaml` and run\n\n"
        f"```sh\npip install lazymerge=={__version__}\nlazymerge merge recipe.yaml -o {title}\n```\n\n"
        "`lazymerge.json` next to this card lists every input file's size and header hash and "
        "every output shard's sha256; the same inputs give the same bytes.\n",
    ]
    return "\n".join(p for p in parts if p)


def _description(plan: MergePlan) -> str:
    recipe = plan.recipe
    lines = [f"A merge made with [lazymerge](https://pypi.org/project/lazymerge/) {__version__}:\n"]
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
