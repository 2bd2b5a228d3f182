"""python -m benchmarks.device: `--device cpu` against `--device cuda` on one machine.

The prepared check for a lent GPU machine: generates a 13B-shaped pair (founding recipe),
merges it on each device (cold cache when the machine allows), and records wall time,
peak RSS and how far the outputs differ: bit-identical tensors, and the largest distance
in fp16 ulps among the others (LoRA tensors may differ by 1: the GEMM's order). Then one
more `--device cuda` merge, warm, under cProfile: where the GPU path's main thread spends
its time (host staging from the maps, the GPU's work and copies, waits for the writer),
which says whether overlapping transfers on CUDA streams would pay.
"""

from __future__ import annotations

import argparse
import json
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.__main__ import HERE, machine
from benchmarks.runner import drop_caches, fresh_models, run_child, write_recipe


def compare(a: Path, b: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    same, differ, worst = 0, [], 0
    for fa in sorted(a.glob("*.safetensors")):
        with safe_open(fa, "pt") as x, safe_open(b / fa.name, "pt") as y:
            for name in x.keys():  # noqa: SIM118 (safe_open is not a mapping)
                ta, tb = x.get_tensor(name), y.get_tensor(name)
                if torch.equal(ta, tb):
                    same += 1
                    continue
                differ.append(name)
                if ta.dtype in (torch.float16, torch.bfloat16):
                    d = (ta.view(torch.int16).int() - tb.view(torch.int16).int()).abs().max()
                    worst = max(worst, int(d))
    return {"identical_tensors": same, "differing_tensors": differ, "max_ulps": worst}


def merge_args(recipe: Path, out: Path, device: str, *extra: str) -> list[str]:
    """`-m lazymerge merge ...` for a child Python: quiet, on `device`."""
    return ["-m", "lazymerge", "merge", str(recipe), "-o", str(out), "-q", "--device", device,
            *extra]  # fmt: skip


def profile(recipe: Path, out: Path, device: str, top: int = 15) -> list[dict[str, Any]]:
    """A merge on `device` under cProfile: its `top` functions by own time."""
    prof = out.parent / f"{out.name}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof),
           *merge_args(recipe, out, device, "--overwrite")]  # fmt: skip
    run_child(cmd, f"profiled merge --device {device}")
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {"function": f"{Path(file).name}:{line} {name}", "calls": calls,
         "own_seconds": round(own, 3), "cumulative_seconds": round(cum, 3)}
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "device.json")
    args = parser.parse_args(argv)
    work = args.cache / "device"
    try:
        fresh_models(work, args.layers)
        recipe = write_recipe(work, args.layers)
        runs = []
        for device in ("cpu", "cuda"):
            cold = drop_caches()
            cmd = [sys.executable, *merge_args(recipe, work / device, device, "--json")]
            child = run_child(cmd, f"merge --device {device}")
            report = json.loads(child.stdout)
            runs.append({
                "device": device, "cache": "cold" if cold else "warm",
                "wall_seconds": round(child.seconds, 2), "merge_seconds": report["seconds"],
                "peak_rss": child.peak_rss,
            })  # fmt: skip
            print(f"{device:5} {child.seconds:6.1f} s wall, {report['seconds']:6.1f} s merge, "
                  f"{child.peak_rss / 2**20:5.0f} MiB")  # fmt: skip
        diff = compare(work / "cpu", work / "cuda")
        hot = profile(recipe, work / "cuda", "cuda")
        for row in hot:
            print(f"{row['own_seconds']:8.3f} s own {row['cumulative_seconds']:8.3f} s cum "
                  f"{row['calls']:7d}x  {row['function']}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"identical tensors {diff['identical_tensors']}, differing {len(diff['differing_tensors'])}, "
          f"max {diff['max_ulps']} ulp")  # fmt: skip
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "layers": args.layers,
        "command": "python -m benchmarks.device " + " ".join(argv or sys.argv[1:]),
        "runs": runs, "compare": diff, "cuda_profile_warm": hot,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if diff["max_ulps"] <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
