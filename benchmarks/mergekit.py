"""mergekit, side by side: its own venv under the benchmark cache, the founding recipe in
its YAML, never a dependency of lazymerge."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any


def ensure_mergekit(cache: Path) -> tuple[Path | None, str]:
    """Path of `mergekit-yaml` in cache/mergekit-venv (installed on first use), or why not."""
    venv = cache / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe, ""
    # The same torch as ours: an unpinned one would pull a multi-GB CUDA build.
    torch_pin = "torch==" + version("torch").split("+")[0]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", torch_pin],
        [str(venv / "bin" / "pip"), "install", "--quiet", "mergekit", torch_pin],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return None, f"cannot install mergekit: {lines[-1] if lines else done.returncode}"
    return exe, ""


def config(
    base: Path,
    other: Path,
    lora: Path,
    *,
    layers: int,
    span: int,
    ratios: tuple[float, float],
    lora_weight: float,
) -> dict[str, Any]:
    """The founding recipe in mergekit's terms.

    Per layer of the span lazymerge computes (1 - r) base + r (other + w Δ), r going
    linearly from ratios[0] to ratios[1]. By linearity that is
    (1 - r) base + (1 - w) r other + w r (other + Δ): three models in a linear merge, the
    LoRA at full weight through mergekit's `model+lora` syntax, each weight a gradient.
    Embeddings, final norm and lm_head stay the base's (conditional weights); the layers
    after the span are a base-only slice.
    """
    r0, r1 = ratios

    def weight(outside: float, factor: float, offset: float = 0.0) -> list[dict[str, Any]]:
        # offset + factor * r over the span; mergekit gives a one-layer slice t=1 (the
        # last anchor) where DESIGN gives it the first, hence a scalar there.
        start, end = offset + factor * r0, offset + factor * r1
        inside: float | list[float] = start if span == 1 else [start, end]
        return [
            {"filter": f, "value": outside} for f in ("embed_tokens", "model.norm", "lm_head")
        ] + [{"value": inside}]

    def source(model: str, w: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": model, "layer_range": [0, span], "parameters": {"weight": w}}

    slices: list[dict[str, Any]] = [
        {
            "sources": [
                source(str(base), weight(1.0, -1.0, 1.0)),
                source(str(other), weight(0.0, 1 - lora_weight)),
                source(f"{other}+{lora}", weight(0.0, lora_weight)),
            ]
        }
    ]
    if span < layers:
        tail = {"model": str(base), "layer_range": [span, layers], "parameters": {"weight": 1.0}}
        slices.append({"sources": [tail]})
    return {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "float16",
        "slices": slices,
    }


def command(exe: Path, config_file: Path, out: Path, lora_cache: Path) -> list[str]:
    return [
        str(exe), str(config_file), str(out),
        "--lora-merge-cache", str(lora_cache),
        "--out-shard-size", "1B",  # parameters: 2 GB of fp16, like our shards
        "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
    ]  # fmt: skip
