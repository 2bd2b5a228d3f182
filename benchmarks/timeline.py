"""python -m benchmarks.timeline RECIPE -o OUT: where a merge waits, over time.

Runs one merge in this process and samples, every `--interval` seconds: the disk's read
and write throughput (the block device holding OUT, from /proc/diskstats), the cores
this process used, the CPU the host stole from this VM meanwhile (benchmarks/host.py: a
slow stretch with high steal is the neighbours'), its resident memory (all of it, and
its mapped files' pages: where the peak falls), and the tensor being written. Then the
same per phase: `import` (before the first tensor, while torch loads on its thread and
the read-ahead runs: torch is not imported before the merge, as in the command), blended
(`compute`) tensors, plain copies. A compute phase near one core with the disk idle is
bound by the arithmetic; a copy phase at the disk's rate is bound by the disk. Linux
only. The inputs are assumed on the same disk as OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.host import steal_share, stolen


def device_bytes(out: Path) -> tuple[int, int]:
    """Bytes read and written so far by the block device that holds `out`."""
    dev = os.stat(out).st_dev
    major, minor = os.major(dev), os.minor(dev)
    with open("/proc/diskstats", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == major and int(fields[1]) == minor:
                return int(fields[5]) * 512, int(fields[9]) * 512
    raise RuntimeError(f"{out}: its device {major}:{minor} is not in /proc/diskstats")


def resident_mib() -> tuple[int, int]:
    """This process's resident memory now, MiB: all of it (VmRSS) and its mapped files'
    pages (RssFile: the inputs' pages the maps hold): where in a merge its peak falls."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssFile"):
                fields[key] = int(value.split()[0]) // 1024
    return fields.get("VmRSS", 0), fields.get("RssFile", 0)


class Sampler:
    def __init__(self, where: Path, interval: float) -> None:
        self.where, self.interval = where, interval
        self.current = "start"  # what the merge is doing, set from the merge's thread
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = last_t = time.monotonic()
        last_io, last_cpu = device_bytes(self.where), sum(os.times()[:2])
        last_steal = stolen()
        while not self._stop.wait(self.interval):
            now, io, cpu = time.monotonic(), device_bytes(self.where), sum(os.times()[:2])
            dt, (rss, files), steal = now - last_t, resident_mib(), stolen()
            share = steal_share(last_steal, steal, dt)
            self.rows.append({
                "t": round(now - start, 2),
                "read_mb_s": round((io[0] - last_io[0]) / dt / 1e6),
                "write_mb_s": round((io[1] - last_io[1]) / dt / 1e6),
                "cores": round((cpu - last_cpu) / dt, 2),
                # the host's share of all cores (host.py): a slow sample may be its doing
                "steal_pct": None if share is None else round(100 * share),
                "rss_mib": rss,
                "file_mib": files,
                "doing": self.current,
            })  # fmt: skip
            last_t, last_io, last_cpu, last_steal = now, io, cpu, steal

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def phases(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Time, and throughput, cores and steal averaged over that time, per kind of work
    (the tensor's action). A sample covers the time since the one before it: a late one
    (its thread waited for the GIL) covers more."""
    spans: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    last = 0.0
    for row in rows:
        spans[row["doing"].rsplit(" ", 1)[-1]].append((row["t"] - last, row))
        last = row["t"]
    out: dict[str, dict[str, float]] = {}
    for kind, g in spans.items():
        total = sum(dt for dt, _ in g)
        out[kind] = {"seconds": round(total, 2)}
        for key in ("read_mb_s", "write_mb_s", "cores", "steal_pct"):
            known = [(dt, r[key]) for dt, r in g if r[key] is not None]
            weight = sum(dt for dt, _ in known)
            out[kind][key] = (
                round(sum(dt * v for dt, v in known) / weight, 2) if weight else float("nan")
            )
    return out


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}%"


def show(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]]) -> None:
    """The samples, then the phases, as a table on stdout."""
    print(
        f"{'t':>6} {'read MB/s':>9} {'write MB/s':>10} {'cores':>5} {'steal':>5} {'RSS MiB':>7} {'files':>5}  doing"
    )
    for r in rows:
        print(
            f"{r['t']:6.1f} {r['read_mb_s']:9} {r['write_mb_s']:10} {r['cores']:5.2f}"
            f" {_pct(r['steal_pct']):>5} {r['rss_mib']:7} {r['file_mib']:5}  {r['doing']}"
        )
    for kind, p in summary.items():
        print(f"{kind:>10}: {p['seconds']:5.1f} s, read {p['read_mb_s']:.0f} MB/s, "
              f"write {p['write_mb_s']:.0f} MB/s, {p['cores']:.2f} cores, "
              f"host steal {p['steal_pct']:.0f} %")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.timeline", description=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the samples and phases here")
    parser.add_argument("--lanes", type=int, default=0, help="compute lanes (default: the cores)")
    args = parser.parse_args(argv)

    from lazymerge.plan import build_plan
    from lazymerge.recipe import load_recipe
    from lazymerge.run import merge, shard
    from lazymerge.run.options import MergeOptions

    plan = build_plan(load_recipe(args.recipe))
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(args.out, args.interval)
    sampler.current = "torch import"  # until the first tensor: torch loads on its thread
    cold_torch = "torch" not in sys.modules  # the merge imports it, as the command does
    in_order = shard._in_order

    def traced_in_order(job: Any, ahead: Any, tensors: Any) -> Any:
        # Patched here, not before the merge: importing lazymerge.run.tensor imports
        # torch, whose import the merge hides behind its read-ahead (run/load.py).
        from lazymerge.run import tensor

        write_tensor = tensor.write_tensor

        def traced(ctx: Any, t: Any) -> None:  # the executor has no per-tensor hook
            sampler.current = f"{t.name} {t.action}"
            write_tensor(ctx, t)

        tensor.write_tensor = traced
        try:
            return in_order(job, ahead, tensors)
        finally:
            tensor.write_tensor = write_tensor

    shard._in_order = traced_in_order
    try:
        with sampler:
            opts = MergeOptions(overwrite=True, progress=False, lanes=args.lanes)
            result = merge.run_merge(plan, args.out, opts)
            sampler.current = "finish"
    finally:
        shard._in_order = in_order
    torch_note = "torch imported by the merge" if cold_torch else "torch was imported already"
    print(f"merge {result.seconds:.1f} s ({torch_note}); samples every {args.interval} s")
    summary = phases(sampler.rows)
    show(sampler.rows, summary)
    if args.json:
        record = {"merge_seconds": result.seconds, "samples": sampler.rows, "phases": summary}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
