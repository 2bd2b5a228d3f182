"""python -m benchmarks.firstbyte RECIPE [--repeat N] [--lane 0,1]: when a
merge's start-up ends (issue 19, "start-up hidden behind I/O"): seconds from the
process's start to torch imported (on its own thread: run/load.py), to the first byte
handed to the shard writer, and to the end. Rounds alternate a cold run (the page cache
dropped: torch's own files too, as after a reboot), a warm one (every page kept: torch's
and the inputs') and `inputs` (the cache dropped, then torch imported once by another
process: the usual case, a merge after others), and within each, the copy lane on and
off (LAZYMERGE_COPY_LANE: 1, copies on a thread of their own from the start; 0, in file
order on the merge's thread, which waits for torch first).
"""

from __future__ import annotations

import argparse
import builtins
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import drop_caches

MODES = ("cold", "warm", "inputs")  # inputs: only the inputs cold, torch's files cached


def child(recipe: str, out: str) -> None:
    """One merge in this process, timed from its start (the parent's `-m` start-up aside)."""
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    real_import = builtins.__import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        module = real_import(name, *args, **kwargs)
        if name == "lazymerge.read.mapped":  # imports torch at its top
            marks.setdefault("torch", time.monotonic() - t0)
        return module

    builtins.__import__ = spy
    from lazymerge.cli import main
    from lazymerge.write import safetensors

    for name in ("write", "copy", "copy_ahead"):
        real = getattr(safetensors.ShardWriter, name)

        def first(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            marks.setdefault("first", time.monotonic() - t0)
            return _real(self, *args, **kwargs)

        setattr(safetensors.ShardWriter, name, first)
    assert main(["merge", recipe, "-o", out, "-q", "--overwrite"]) == 0
    print(marks["torch"], marks["first"], time.monotonic() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--modes", default="cold,warm", help=", ".join(MODES) + ": some of them")
    p.add_argument("--lane", default="0,1", help="LAZYMERGE_COPY_LANE values, comma-separated")
    p.add_argument("--out", type=Path, default=Path("/tmp/lazymerge-bench-firstbyte"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.recipe, str(args.out))
        return
    cases = [(m, h) for m in args.modes.split(",") for h in args.lane.split(",")]
    runs: dict[tuple[str, str], list[list[float]]] = {c: [] for c in cases}
    for _ in range(args.repeat):
        for mode, head in cases:
            runs[mode, head].append(_round(args, mode, head))
    for (mode, head), rs in runs.items():
        each = "; ".join(" / ".join(f"{x:.2f}" for x in r) for r in rs)
        med = [statistics.median(r[i] for r in rs) for i in range(3)]
        print(f"{mode:6s} copy lane {head}  torch / first byte / end: {each}  "
              f"(medians {med[0]:.2f} / {med[1]:.2f} / {med[2]:.2f} s)")  # fmt: skip


def _round(args: argparse.Namespace, mode: str, head: str) -> list[float]:
    shutil.rmtree(args.out, ignore_errors=True)
    drop_caches(mode != "warm")
    if mode == "inputs":
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
    cmd = [sys.executable, "-m", "benchmarks.firstbyte", args.recipe, "--child"]
    env = {**os.environ, "LAZYMERGE_COPY_LANE": head}
    done = subprocess.run([*cmd, "--out", str(args.out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-1500:])
    return [float(x) for x in done.stdout.split()[-3:]]


if __name__ == "__main__":
    main()
