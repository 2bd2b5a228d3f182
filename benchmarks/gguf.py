"""python -m benchmarks.gguf [--layers N] [--rounds R] [--quants q8_0,q4_k_m] [--tiny]
[--work DIR]: the founding recipe on 13B-shaped checkpoints written as safetensors and as
GGUF (issue 18), against the copy baseline of the same bytes, in one run.

Rounds alternate safetensors merge / copy / each GGUF quant, cache dropped before each,
so the disk's drifts hit all alike; medians are reported with peak RSS and file sizes.
The fixture has no tokenizer files (`benchmarks.generate` writes weights only): the
GGUFs are written with --no-tokenizer, which changes nothing but a few header keys.
The orchestrator never imports torch (peak RSS is each child's own: runner.run_child).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.runner import (
    Child,
    copy_baseline,
    drop_caches,
    fresh_models,
    run_child,
    write_recipe,
)

HERE = Path(__file__).resolve().parent
MiB = 2**20
# The goals: q8_0 within 1.3x of the safetensors merge's time; peak RSS <= 512 MiB.
Q8_TIME_GOAL, PEAK_GOAL = 1.3, 512 * MiB


def ensure_models(work: Path, layers: int, tiny: bool) -> Path:
    """work/models-N: base, other, LoRA, generated once (a marker, written last)."""
    models = work / f"models-{layers}{'-tiny' if tiny else ''}"
    if not (models / "complete.json").is_file():
        gen = fresh_models(models, layers, tiny)
        (models / "complete.json").write_text(json.dumps({"seconds": gen.seconds}) + "\n")
    return models


def merge_cmd(recipe: Path, out: Path, quant: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "lazymerge", "merge", str(recipe), "-o", str(out), "-q"]
    return cmd + (["--format", "gguf", "--quant", quant, "--no-tokenizer"] if quant else [])


def one_round(
    recipe: Path, work: Path, quants: list[str], reads: list[list[Any]]
) -> dict[str, Any]:
    """The safetensors merge, the copy of its bytes, each GGUF: seconds, peak RSS, bytes."""
    result: dict[str, Any] = {}
    sizes: list[int] = []
    out = work / "out"
    for case in ["safetensors", "copy", *quants]:
        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        if case == "copy":  # the safetensors merge's reads and its files' sizes
            result["copy"] = {"seconds": copy_baseline(reads, sizes, out).seconds}
            continue
        quant = None if case == "safetensors" else case
        child: Child = run_child(merge_cmd(recipe, out, quant), f"merge ({case})")
        files = sorted(p for p in out.iterdir() if p.suffix in (".safetensors", ".gguf"))
        sizes = sizes or [f.stat().st_size for f in files]
        written = sum(f.stat().st_size for f in files)
        result[case] = {"seconds": child.seconds, "peak_rss": child.peak_rss, "bytes": written}
    shutil.rmtree(out, ignore_errors=True)
    return result


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    cases = list(rounds[0])
    table = {}
    for case in cases:
        runs = [r[case]["seconds"] for r in rounds]
        entry = {"runs": runs, "median": statistics.median(runs)}
        if "peak_rss" in rounds[0][case]:
            entry |= {
                "peak_rss": max(r[case]["peak_rss"] for r in rounds),
                "bytes": rounds[0][case]["bytes"],
            }
        table[case] = entry
    st = table["safetensors"]["median"]
    for entry in table.values():
        entry["of_safetensors"] = entry["median"] / st
        entry["of_copy"] = entry["median"] / table["copy"]["median"]
    return table


def report(table: dict[str, Any]) -> str:
    lines = [
        "| case | runs s | median s | / safetensors | / copy | peak MiB | size GiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, e in table.items():
        runs = ", ".join(f"{s:.1f}" for s in e["runs"])
        peak = f"{e['peak_rss'] / MiB:.0f}" if "peak_rss" in e else "-"
        size = f"{e['bytes'] / 2**30:.2f}" if "bytes" in e else "-"
        lines.append(
            f"| {case} | {runs} | {e['median']:.1f} | {e['of_safetensors']:.2f} | "
            f"{e['of_copy']:.2f} | {peak} | {size} |"
        )
    q8 = table.get("q8_0")
    if q8 is not None:
        met = "met" if q8["of_safetensors"] <= Q8_TIME_GOAL else "MISSED"
        lines.append(
            f"q8_0 within {Q8_TIME_GOAL}x of the safetensors merge: {met} ({q8['of_safetensors']:.2f}x)"
        )
    for case, e in table.items():
        if "peak_rss" in e:
            met = "met" if e["peak_rss"] <= PEAK_GOAL else "MISSED"
            lines.append(f"{case}: peak RSS <= 512 MiB {met} ({e['peak_rss'] / MiB:.0f} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gguf", description=__doc__)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quants", default="q8_0,q4_k_m")
    p.add_argument("--tiny", action="store_true", help="a few MB of models (a smoke run)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lazymerge-bench-gguf"))
    p.add_argument("--json", type=Path, default=HERE / "results" / "gguf.json")
    args = p.parse_args(argv)
    models = ensure_models(args.work, args.layers, args.tiny)
    recipe = write_recipe(models, args.layers)
    plan = json.loads(
        run_child([sys.executable, "-m", "benchmarks.reads", str(recipe)], "plan").stdout
    )
    quants = [q for q in args.quants.split(",") if q]
    rounds = []
    for k in range(args.rounds):
        print(f"[gguf] round {k + 1}/{args.rounds}", file=sys.stderr)
        rounds.append(one_round(recipe, args.work, quants, plan["reads"]))
    table = summarize(rounds)
    print(report(table))
    record = {
        "layers": args.layers,
        "tiny": args.tiny,
        "bytes_read": plan["bytes_to_read"],
        "cases": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
