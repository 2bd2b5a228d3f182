"""python -m benchmarks.startup [--repeat N] [--workdir DIR]: how long the commands people
type first take, start-up included — `--version`, `--help`, `plan`, `inspect`, `verify` —
on the demo's models (built in DIR if missing), each run N times in turn, medians reported.

Figures are wall time of the whole process (`python -m lazymerge ...`), warm page cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner import run_child


def commands(demo: Path) -> dict[str, list[str]]:
    recipe = demo / "airolima-chronos.yaml"
    return {
        "--version": ["--version"],
        "--help": ["--help"],
        "plan": ["plan", str(recipe)],
        "inspect": ["inspect", str(demo / "chronos-13b-v2")],
        "verify": ["verify", str(demo / "airolima-chronos-grad")],
    }


def ensure_demo(demo: Path) -> None:
    """The demo's models and merges, made by `python -m lazymerge.demo` when missing."""
    if not (demo / "airolima-chronos-grad" / "model.safetensors.index.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "lazymerge.demo", str(demo)],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    ensure_demo(args.workdir.resolve())
    todo = commands(args.workdir.resolve())
    seconds: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.repeat):  # in turn, so that drift hits every command alike
        for name, cmd in todo.items():
            start = time.monotonic()
            run_child([sys.executable, "-m", "lazymerge", *cmd], name)
            seconds[name].append(time.monotonic() - start)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in medians.items():
        print(f"{name:<10} {s:6.3f} s  (median of {args.repeat}; min {min(seconds[name]):.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps({"repeat": args.repeat, "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
