"""The blend picture: per layer, how much of each model the merge takes (matplotlib)."""

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
from typing import TYPE_CHECKING

from lazymerge.errors import LazyMergeError, OutputError
from lazymerge.plan.model import MergePlan
from lazymerge.views.report import LayerRow, layer_rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# The founding model card's colours: "Blue is chronos [the base] and green is airolima".
BASE_COLOUR, OTHER_COLOUR = "#3b6fb6", "#4caf50"
FORMATS = (".png", ".svg", ".pdf")


def plot_blend(plan: MergePlan, path: Path, title: str) -> Path:
    """Draw the per-layer composition into `path` (.png, .svg or .pdf)."""
    return render(layer_rows(plan), path, title)


class PictureJob:
    """The blend picture drawn by a child process while the merge runs, so matplotlib's
    memory never adds to the merge's peak and its start-up costs no wall time."""

    def __init__(self, plan: MergePlan, title: str) -> None:
        fd, name = tempfile.mkstemp(suffix=".png", prefix="lazymerge-blend-")
        os.close(fd)
        self.path = Path(name)
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


def render(rows: list[LayerRow], path: Path, title: str) -> Path:
    if path.suffix.lower() not in FORMATS:
        raise OutputError(f"{path}: the picture must be one of {', '.join(FORMATS)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LazyMergeError("plotting needs matplotlib: pip install 'lazymerge[plot]'") from None
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


if __name__ == "__main__":  # python -m lazymerge.views.plot PATH TITLE < rows.json
    with contextlib.suppress(OSError):
        os.nice(19)  # the merge beside us comes first; we take the CPU it leaves idle
    try:
        render([LayerRow(**r) for r in json.load(sys.stdin)], Path(sys.argv[1]), sys.argv[2])
    except LazyMergeError as e:
        sys.exit(str(e))
