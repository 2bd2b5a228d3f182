"""The blend picture: per layer, how much of each model the merge takes (matplotlib).

The founding recipe's: base and other, and the LoRAs' effective weights (`render`). An
N-model merge's: each model's weight as a share of the layer's total |weight|, and each
model's density where the method has one (`render_shares`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lazymerge.errors import LazyMergeError, OutputError
from lazymerge.plan.model import MergePlan
from lazymerge.views import nmodel
from lazymerge.views.report import LayerRow, layer_rows

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.axes import Axes

    Panel = Callable[[Axes, list[nmodel.ShareRow], dict[str, str], str], None]

# The founding model card's colours: "Blue is chronos [the base] and green is airolima".
BASE_COLOUR, OTHER_COLOUR = "#3b6fb6", "#4caf50"
# An N-model merge's: the base blue, as above, its models after it in this order.
MODEL_COLOURS = (OTHER_COLOUR, "#e4572e", "#f2a541", "#8e6bbf", "#17becf", "#d45087", "#8c564b")
FORMATS = (".png", ".svg", ".pdf")


def plot_blend(plan: MergePlan, path: Path, title: str) -> Path:
    """Draw the per-layer composition into `path` (.png, .svg or .pdf)."""
    if plan.recipe.merge is not None:
        return render_shares(share_picture(plan), path, title)
    return render(layer_rows(plan), path, title)


def share_picture(plan: MergePlan) -> dict[str, Any]:
    """What an N-model merge's picture draws, as plain data (the child takes it as JSON):
    the method, every input's label (the base first), the rows."""
    assert plan.recipe.merge is not None
    return {
        "method": plan.recipe.merge.name,
        "labels": list(nmodel.labels(plan).values()),
        "rows": [asdict(r) for r in nmodel.share_rows(plan)],
    }


class PictureJob:
    """The blend picture drawn by a child process while the merge runs, so matplotlib's
    memory never adds to the merge's peak and its start-up costs no wall time."""

    def __init__(self, plan: MergePlan, title: str) -> None:
        fd, name = tempfile.mkstemp(suffix=".png", prefix="lazymerge-blend-")
        os.close(fd)
        self.path = Path(name)
        # The founding recipe's rows are a list; an N-model merge's picture, an object.
        if plan.recipe.merge is not None:
            rows = json.dumps(share_picture(plan))
        else:
            rows = json.dumps([asdict(r) for r in layer_rows(plan)])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lazymerge.views.plot", str(self.path), title],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self._proc.stdin is not None
        with self._proc.stdin as stdin:
            stdin.write(rows)

    def collect(self, dest: Path) -> bool:
        """Wait for the picture and copy it to `dest`; False when it could not be drawn."""
        ok = self._proc.wait() == 0 and self.path.stat().st_size > 0
        if ok:
            # Copied into a file open() creates, not moved: mkstemp made ours 0600, and
            # the output's files get 0666 & ~umask like every other file the merge writes.
            dest.unlink(missing_ok=True)
            shutil.copyfile(self.path, dest)
        self.discard()
        return ok

    def discard(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.path.unlink(missing_ok=True)


def _pyplot(path: Path) -> ModuleType:
    """matplotlib's pyplot, drawing to files, once `path` is a format it writes."""
    if path.suffix.lower() not in FORMATS:
        raise OutputError(f"{path}: the picture must be one of {', '.join(FORMATS)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LazyMergeError("plotting needs matplotlib: pip install 'lazymerge[plot]'") from None
    return plt


def render(rows: list[LayerRow], path: Path, title: str) -> Path:
    plt = _pyplot(path)
    labels = list(dict.fromkeys(label for r in rows for label in r.ratios))
    fig, axes = plt.subplots(
        len(labels),
        1,
        figsize=(max(6.0, 0.28 * len(rows) + 2), 2.6 + 1.4 * len(labels)),
        squeeze=False,
        sharex=True,
    )
    for ax, label in zip(axes[:, 0], labels, strict=True):
        _panel(ax, rows, label, show_legend=ax is axes[0, 0])
        if len(labels) > 1:
            ax.set_title(f"tensors matching {label!r}", fontsize=9)
    axes[-1, 0].set_xlabel("decoder layer (rest: embeddings, final norm, lm_head)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _panel(ax: Axes, rows: list[LayerRow], label: str, show_legend: bool) -> None:
    xs = list(range(len(rows)))
    other = [r.ratios.get(label, 0.0) for r in rows]
    base = [1 - v for v in other]
    lora_other = [sum(v for k, v in r.loras.items() if k.startswith("other:")) for r in rows]
    lora_base = [sum(v for k, v in r.loras.items() if k.startswith("base:")) for r in rows]
    ax.bar(xs, other, color=OTHER_COLOUR, width=0.9, label="other")
    ax.bar(xs, base, bottom=other, color=BASE_COLOUR, width=0.9, label="base")
    if any(lora_other):  # the LoRA's effective share, drawn inside the model it sits on
        ax.bar(
            xs,
            lora_other,
            color="none",
            edgecolor="white",
            hatch="////",
            width=0.9,
            label="LoRA on other (effective weight)",
        )
    if any(lora_base):
        ax.bar(
            xs,
            lora_base,
            bottom=other,
            color="none",
            edgecolor="white",
            hatch="\\\\\\\\",
            width=0.9,
            label="LoRA on base (effective weight)",
        )
    ax.set_xticks(xs, ["rest" if r.layer is None else str(r.layer) for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    if show_legend:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)


def render_shares(picture: dict[str, Any], path: Path, title: str) -> Path:
    """An N-model merge's picture (share_picture's data): per layer, each model's weight
    share stacked, then each model's density; sce, which weighs by what it measures while
    merging, its select_topk and a line saying so."""
    plt = _pyplot(path)
    rows = [nmodel.ShareRow(**r) for r in picture["rows"]]
    method, names = picture["method"], picture["labels"]
    colours = dict(zip(names, (BASE_COLOUR, *MODEL_COLOURS * len(names)), strict=False))
    panels = _panels(rows, method)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(7.0, 0.28 * len(rows) + 4), 1.2 + 2.6 * len(panels)),
        squeeze=False, sharex=True,
    )  # fmt: skip
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        panel(ax, rows, colours, method)
    xs = list(range(len(rows)))
    axes[-1, 0].set_xticks(
        xs, ["rest" if r.layer is None else str(r.layer) for r in rows], fontsize=7
    )
    axes[-1, 0].set_xlabel("decoder layer (rest: embeddings, final norm, lm_head)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legends sit right of the axes
    plt.close(fig)
    return path


def _panels(rows: list[nmodel.ShareRow], method: str) -> list[Panel]:
    """What the rows have to show: where sliced layers come from, weight shares (sce:
    its select_topk instead), densities, t."""
    panels: list[Panel] = [_sources] if any(r.sources for r in rows) else []
    if any(r.shares for r in rows):
        panels.append(_shares)
    elif method == "sce":
        panels.append(_no_weights)
    if any(r.densities for r in rows):
        panels.append(_densities)
    if any(r.t is not None for r in rows):
        panels.append(_t)
    return panels or [_sources]


def _sources(ax: Axes, rows: list[nmodel.ShareRow], colours: dict[str, str], method: str) -> None:
    """Layer surgery: each output layer a bar split among its sources, each in its model's
    colour and labelled with the source layer."""
    from matplotlib.patches import Patch

    for x, r in enumerate(rows):
        for k, (name, layer) in enumerate(r.sources or []):
            part = 1 / len(r.sources or [1])
            ax.bar(x, part, bottom=k * part, color=colours.get(name, BASE_COLOUR), width=0.9)
            ax.text(x, (k + 0.5) * part, str(layer), ha="center", va="center", fontsize=6)
    handles = [Patch(color=c, label=n) for n, c in colours.items()]
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_title(f"{method}: each output layer's source layers, by model", fontsize=9)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _t(ax: Axes, rows: list[nmodel.ShareRow], colours: dict[str, str], method: str) -> None:
    points = [(x, r.t) for x, r in enumerate(rows) if r.t is not None]
    ax.plot(*zip(*points, strict=True), color=BASE_COLOUR, marker="o", markersize=3)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("t (mean)")
    ax.set_title(f"{method}: t, the layer's mean over its tensors (0: the base)", fontsize=9)


def _shares(ax: Axes, rows: list[nmodel.ShareRow], colours: dict[str, str], method: str) -> None:
    """Stacked bars, one colour per model: positive shares up from 0, negative down."""
    xs = list(range(len(rows)))
    up, down = [0.0] * len(rows), [0.0] * len(rows)
    for name, colour in colours.items():
        if not any(name in r.shares for r in rows):
            continue  # the base of a task-vector method: the vectors are taken against it
        values = [r.shares.get(name, 0.0) for r in rows]
        bottoms = [u if v >= 0 else d for v, u, d in zip(values, up, down, strict=True)]
        ax.bar(xs, values, bottom=bottoms, color=colour, width=0.9, label=name)
        up = [u + max(v, 0.0) for u, v in zip(up, values, strict=True)]
        down = [d + min(v, 0.0) for d, v in zip(down, values, strict=True)]
    ax.set_ylim(min(0.0, *down), 1)
    if min(down) < 0:  # a negative weight: its share hangs below the line
        ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("weight share")
    ax.set_title(f"{method}: each model's weight / the layer's total |weight|", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _densities(ax: Axes, rows: list[nmodel.ShareRow], colours: dict[str, str], method: str) -> None:
    xs = list(range(len(rows)))
    for name, colour in colours.items():
        points = [
            (x, r.densities[name]) for x, r in zip(xs, rows, strict=True) if name in r.densities
        ]
        if points:
            ax.plot(*zip(*points, strict=True), color=colour, marker="o", markersize=3, label=name)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("density")
    ax.set_title("the fraction of each model's task vector kept", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _no_weights(
    ax: Axes, rows: list[nmodel.ShareRow], colours: dict[str, str], method: str
) -> None:
    """sce has no weight to draw: its select_topk per layer, and why."""
    names = list(colours)
    xs = list(range(len(rows)))
    ax.bar(xs, [1.0 if r.topk is None else r.topk for r in rows], color=BASE_COLOUR, width=0.9)
    ax.set_ylim(0, 1.45)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_ylabel("select_topk")
    ax.set_title(f"{method}: the fraction of elements kept, by their variance", fontsize=9)
    note = (
        "SCE keeps the elements that vary most over the models and weighs each model\n"
        "by its task vector's mean square, measured while merging: no weight to draw.\n"
        f"models: {', '.join(names[1:])} (base {names[0]})"
    )
    ax.text(0.5, 0.97, note, transform=ax.transAxes, ha="center", va="top", fontsize=8)


def _draw(data: Any, path: Path, title: str) -> Path:
    """The picture PictureJob's JSON describes: the founding rows (a list) or an N-model
    merge's (share_picture's object)."""
    if isinstance(data, list):
        return render([LayerRow(**r) for r in data], path, title)
    return render_shares(data, path, title)


if __name__ == "__main__":  # python -m lazymerge.views.plot PATH TITLE < rows.json
    with contextlib.suppress(OSError):
        os.nice(19)  # the merge beside us comes first; we take the CPU it leaves idle
    try:
        _draw(json.load(sys.stdin), Path(sys.argv[1]), sys.argv[2])
    except LazyMergeError as e:
        sys.exit(str(e))
