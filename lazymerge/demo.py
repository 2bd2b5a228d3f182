"""`make demo`: build a small Llama pair + LoRA, then run the founding recipe and its
sister on them.

The founding recipe (examples/airolima-chronos.yaml) is scaled to the demo's depth:
its span [0, 25) of 40 layers becomes [0, 5) of 8. The merge runs as a separate
`lazymerge merge` process so the peak memory it reports is the merge's own.

The example recipes ship inside the package (lazymerge/examples, package data; the
repository's top-level examples/ links to it), so the demo runs alike from a clone
and from an installed wheel.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from lazymerge.testing import LlamaShape, write_llama, write_lora

EXAMPLES = files("lazymerge") / "examples"
FOUNDING = EXAMPLES / "airolima-chronos.yaml"
SISTER = EXAMPLES / "chronolima-airo.yaml"  # LimaRP on the base instead
FOUNDING_LAYERS = 40  # Llama 2 13B


def scaled_recipe(founding: dict[str, Any], layers: int, shard_size: str) -> dict[str, Any]:
    """The founding recipe with its layer span scaled from 40 layers to `layers`."""
    recipe = dict(founding)
    gradient = dict(recipe["gradient"])
    start, end = gradient["layers"]
    gradient["layers"] = [
        round(start * layers / FOUNDING_LAYERS),
        round(end * layers / FOUNDING_LAYERS),
    ]
    recipe["gradient"] = gradient
    recipe["output"] = {**recipe.get("output", {}), "shard_size": shard_size}
    return recipe


def main(workdir: str = ".demo") -> int:
    root = Path(workdir).resolve()
    shape = LlamaShape(layers=8)
    print(f"building demo models in {root} (8-layer Llama, hidden {shape.hidden}, fp16)")
    write_llama(root / "chronos-13b-v2", shape, seed=1, shard_size=4 * 10**6)
    write_llama(root / "airoboros-l2-13b-gpt4-2.0", shape, seed=2, shard_size=4 * 10**6)
    write_lora(root / "limarp-llama2", shape, seed=3, r=16, alpha=16)
    for source, out in ((FOUNDING, "airolima-chronos-grad"), (SISTER, "chronolima-airo-grad")):
        rc = run_recipe(root, source, out, shape.layers)
        if rc != 0:
            return rc
    return 0


def run_recipe(root: Path, source: Traversable, out: str, layers: int) -> int:
    """Scale a shipped recipe to the demo's depth, merge with it, load the result."""
    recipe = scaled_recipe(yaml.safe_load(source.read_text()), layers, "5MB")
    recipe_path = root / source.name
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(
        f"\nrecipe {recipe_path} (from examples/{source.name}, span scaled to {recipe['gradient']['layers']}):"
    )
    print(recipe_path.read_text())
    cmd = [
        sys.executable,
        "-m",
        "lazymerge",
        "merge",
        str(recipe_path),
        "-o",
        str(root / out),
        "--overwrite",
    ]
    print("$ lazymerge " + " ".join(cmd[3:]), flush=True)
    rc = subprocess.call(cmd)
    if rc == 0:
        check_loads(root / out)
    return rc


def check_loads(out: Path) -> None:
    """Load the merge with transformers when it is installed (the dev environment has it)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("(transformers not installed: skipped loading the output)")
        return
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits
    params = sum(p.numel() for p in model.parameters())
    print(
        f"transformers loads {out.name}: {type(model).__name__}, {params:,} parameters, "
        f"{model.dtype}, logits {tuple(logits.shape)} all finite: {bool(logits.isfinite().all())}"
    )


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
