"""python -m benchmarks [--layers 2,4,8] [--no-mergekit] [--tiny] ...: run, print, record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks.report import plot, table, targets
from benchmarks.runner import run_layers

HERE = Path(__file__).resolve().parent


def _version(name: str) -> str:
    """A package's version; run from a source tree (PYTHONPATH=src), its module's."""
    try:
        return version(name)
    except PackageNotFoundError:
        return str(getattr(__import__(name), "__version__", "unknown"))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    mem = next(
        (int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")),
        0,
    ) if Path("/proc/meminfo").exists() else 0  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "lazymerge": _version("lazymerge"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--layers", default="2,4,8", help="comma-separated layer counts (default 2,4,8)"
    )
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LAZYMERGE_BENCH_CACHE", HERE / ".cache")),
                        help="work space: models, outputs, mergekit's venv (default benchmarks/.cache)")  # fmt: skip
    parser.add_argument(
        "--json",
        type=Path,
        default=HERE / "results" / "latest.json",
        help="where to write the JSON record",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=HERE / "results" / "latest.png",
        help="where to write the PNG (needs matplotlib)",
    )
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit side-by-side")
    parser.add_argument(
        "--tiny", action="store_true", help="a few-MB model instead of 13B shapes (smoke test)"
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's models and outputs")
    parser.add_argument(
        "--warm", action="store_true", help="never drop the page cache (figures are warm-cache)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="merge and copy this many times each, alternately; medians reported (default 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    layer_counts = [int(x) for x in args.layers.split(",")]
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "shape": "tiny" if args.tiny else "llama-2-13b",
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": [],
    }
    for n in layer_counts:
        print(f"[bench] {n} layers ...", file=sys.stderr, flush=True)
        record["runs"].append(
            run_layers(
                n,
                args.cache,
                tiny=args.tiny,
                with_mergekit=not args.no_mergekit,
                keep=args.keep,
                cold=not args.warm,
                repeat=max(1, args.repeat),
            )
        )
    print(table(record))
    print(targets(record))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"JSON: {args.json}")
    print(plot(record, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
