"""python -m benchmarks.batch: one family of recipes, four ways, cold cache each.

serial (one `lazymerge merge` after another), `batch --executor local -j 1`, `-j 2`, and
`--executor ray -j 2` (Ray's start included), over the same 13B-shaped inputs; wall time,
the driver's peak RSS (wait4), the largest worker's, and a check that every way wrote
the same bytes (the shards' sha256s and the index's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.__main__ import HERE, machine
from benchmarks.report import NO_PLOT, pyplot
from benchmarks.runner import LORA_WEIGHT, drop_caches, fresh_models, run_child

# A sweep of the founding gradient's start: what a family regeneration looks like.
STARTS = (0.9, 0.7, 0.5, 0.3)
WAYS = {
    "serial": None,
    "local -j 1": ["--executor", "local", "-j", "1"],
    "local -j 2": ["--executor", "local", "-j", "2"],
    "ray -j 2": ["--executor", "ray", "-j", "2"],
}


def write_recipes(work: Path, count: int, shard_size: str) -> list[Path]:
    recipes = []
    for start in STARTS[:count]:
        recipe = {
            "base": "base",
            "other": {"model": "other", "loras": [{"path": "lora", "weight": LORA_WEIGHT}]},
            "gradient": {"values": [start, 0.0]},
            "output": {"dtype": "float16", "shard_size": shard_size},
        }
        recipes.append(work / f"sweep-{start:g}.yaml")
        recipes[-1].write_text(yaml.safe_dump(recipe))
    return recipes


def fingerprints(out_root: Path, recipes: list[Path]) -> dict[str, Any]:
    """Per merge: the shard sha256s its manifest records, and the index's bytes."""
    result = {}
    for r in recipes:
        out = out_root / r.stem
        manifest = json.loads((out / "lazymerge.json").read_text())
        assert manifest["status"] == "complete", out
        index = (out / "model.safetensors.index.json").read_text()
        result[r.stem] = {"shards": manifest["shards"], "index": index}
    return result


def run_way(way: str, recipes: list[Path], work: Path, cold: bool) -> dict[str, Any]:
    out_root = work / "out"
    shutil.rmtree(out_root, ignore_errors=True)
    dropped = drop_caches(cold)
    py = [sys.executable, "-m", "lazymerge"]
    flags = WAYS[way]
    if flags is None:
        seconds, driver_rss, worker_rss = 0.0, 0, 0
        for r in recipes:
            child = run_child(
                [*py, "merge", str(r), "-o", str(out_root / r.stem), "-q", "--json"], way
            )
            seconds += child.seconds
            driver_rss = max(driver_rss, child.peak_rss)
            worker_rss = max(worker_rss, json.loads(child.stdout)["peak_rss"])
    else:
        cmd = [*py, "batch", *map(str, recipes), "--out-root", str(out_root), *flags]
        child = run_child([*cmd, "-q", "--json"], way)
        report = json.loads(child.stdout)
        assert report["ok"], report
        seconds, driver_rss = child.seconds, child.peak_rss
        worker_rss = max(m["peak_rss"] for m in report["merges"])
    return {
        "way": way,
        "cache": "cold" if dropped else "warm",
        "seconds": round(seconds, 2),
        "driver_peak_rss": driver_rss,
        "worker_peak_rss": worker_rss,
        "fingerprints": fingerprints(out_root, recipes),
    }


def plot(record: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    runs = record["runs"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bars = ax.barh([r["way"] for r in runs][::-1], [r["seconds"] for r in runs][::-1])
    ax.bar_label(bars, fmt="%.1f s", padding=3)
    ax.set_xlabel("wall seconds, cold cache")
    ax.set_title(
        f"{len(record['recipes'])} merges of 13B-shaped {record['layers']}-layer models "
        f"({record['cores']} cores)",
        fontsize=10,
    )
    ax.set_xlim(0, max(r["seconds"] for r in runs) * 1.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__)
    parser.add_argument("--layers", type=int, default=2, help="layers per model (default 2)")
    parser.add_argument("--recipes", type=int, default=3, choices=range(1, len(STARTS) + 1))
    parser.add_argument("--shard-size", default="1GB", help="output shard size (default 1GB)")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model (smoke test)")
    parser.add_argument("--warm", action="store_true", help="never drop the page cache")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "batch.json")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "batch.png")
    args = parser.parse_args(argv)
    work = args.cache / "batch"
    try:
        fresh_models(work, args.layers, args.tiny)
        recipes = write_recipes(work, args.recipes, args.shard_size)
        runs = []
        for way in args.ways.split(","):
            print(f"[bench] {way} ...", file=sys.stderr, flush=True)
            runs.append(run_way(way, recipes, work, cold=not args.warm))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = all(r["fingerprints"] == runs[0]["fingerprints"] for r in runs)
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "cores": machine()["cores"],
        "layers": args.layers,
        "shape": "tiny" if args.tiny else "llama-2-13b",
        "recipes": [r.name for r in recipes],
        "command": "python -m benchmarks.batch " + " ".join(argv or sys.argv[1:]),
        "identical_bytes": same,
        "runs": [{k: v for k, v in r.items() if k != "fingerprints"} for r in runs],
    }
    for r in record["runs"]:
        print(
            f"{r['way']:<11} {r['seconds']:7.1f} s  driver {r['driver_peak_rss'] / 2**20:6.0f} MiB"
            f"  worker {r['worker_peak_rss'] / 2**20:6.0f} MiB  ({r['cache']})"
        )
    print(f"same bytes every way: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(plot(record, args.plot))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
