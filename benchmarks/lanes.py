"""python -m benchmarks.lanes --layers 2,4 --lanes 1,2: the founding merge with each lane
count, alternated (issue 19, "blended layers use every core").

Per layer count: the 13B-shaped fixture generated (benchmarks.generate), then `--repeat`
rounds of one cold merge per lane count (`lazymerge merge`, LAZYMERGE_LANES=N), each
timed with its user and system CPU and peak RSS (wait4), then, with `--timeline`, one
cold timeline per lane count (benchmarks.timeline): seconds and cores per phase (blended
`compute`, copied `copy-base`). The fixture is removed afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import drop_caches, fresh_models, write_recipe


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` to completion: wall seconds, user and system CPU, peak RSS (wait4)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read()[-1500:]}")
    return {
        "seconds": round(wall, 3),
        "user": round(usage.ru_utime, 3),
        "system": round(usage.ru_stime, 3),
        "peak_rss": usage.ru_maxrss * 1024,
    }


def merges(work: Path, recipe: Path, lanes: list[int], repeat: int) -> dict[str, Any]:
    """`repeat` cold merges per lane count, alternated; each run and the medians."""
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in lanes}
    cmd = [sys.executable, "-m", "lazymerge", "merge", str(recipe), "-o", str(work / "out"), "-q"]
    for _ in range(repeat):
        for n in lanes:
            shutil.rmtree(work / "out", ignore_errors=True)
            drop_caches()
            runs[n].append(timed(cmd, {**os.environ, "LAZYMERGE_LANES": str(n)}))
    out: dict[str, Any] = {}
    for n, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "user", "system")}
        out[str(n)] = {**med, "peak_rss": max(r["peak_rss"] for r in rs), "runs": rs}
    return out


def timelines(work: Path, recipe: Path, lanes: list[int]) -> dict[str, Any]:
    """One cold timeline per lane count: the merge's seconds and its phases."""
    out: dict[str, Any] = {}
    for n in lanes:
        shutil.rmtree(work / "tl", ignore_errors=True)
        drop_caches()
        record = work / f"timeline-{n}.json"
        cmd = [sys.executable, "-m", "benchmarks.timeline", str(recipe), "-o", str(work / "tl")]
        cmd += ["--json", str(record), "--lanes", str(n)]
        subprocess.run(cmd, check=True, capture_output=True)
        data = json.loads(record.read_text())
        out[str(n)] = {"merge_seconds": data["merge_seconds"], "phases": data["phases"]}
    shutil.rmtree(work / "tl", ignore_errors=True)
    return out


def report(record: dict[str, Any]) -> str:
    lines = ["layers  lanes  merge s (runs)                 user s  sys s  peak MiB  phases"]
    for run in record["runs"]:
        for n, m in run["merges"].items():
            each = ", ".join(f"{r['seconds']:.1f}" for r in m["runs"])
            phases = run.get("timelines", {}).get(n, {}).get("phases", {})
            cores = "; ".join(
                f"{k} {p['seconds']:.1f} s {p['cores']:.2f} cores" for k, p in phases.items()
            )
            lines.append(
                f"{run['layers']:>6}  {n:>5}  {m['seconds']:5.1f} ({each}){'':<{max(0, 22 - len(each))}}"
                f"  {m['user']:6.1f}  {m['system']:5.1f}  {m['peak_rss'] / 2**20:8.0f}  {cores}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes", description=__doc__)
    parser.add_argument("--layers", default="2,4", help="comma-separated layer counts")
    parser.add_argument("--lanes", default="1,2", help="comma-separated lane counts")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of merges")
    parser.add_argument("--cache", type=Path, required=True, help="work space for the fixture")
    parser.add_argument("--json", type=Path, required=True, help="where to write the record")
    parser.add_argument("--timeline", action="store_true", help="also a timeline per lane count")
    parser.add_argument("--keep", action="store_true", help="keep the generated fixture")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model (smoke test)")
    args = parser.parse_args(argv)
    lanes = [int(x) for x in args.lanes.split(",")]
    record: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    record["command"] = "python -m benchmarks.lanes " + " ".join(argv or sys.argv[1:])
    for layers in (int(x) for x in args.layers.split(",")):
        work = args.cache / f"lanes-{layers}"
        try:
            fresh_models(work, layers, args.tiny)
            recipe = write_recipe(work, layers)
            run: dict[str, Any] = {"layers": layers}
            run["merges"] = merges(work, recipe, lanes, max(1, args.repeat))
            if args.timeline:
                run["timelines"] = timelines(work, recipe, lanes)
            record["runs"].append(run)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
