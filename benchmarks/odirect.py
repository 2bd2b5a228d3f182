"""python -m benchmarks.odirect RECIPE: the overlapped copy with each way of writing (issue 19).

The copy of benchmarks/copies.py (a reader thread filling a ring of buffers, the writer
writing in proportion, each file fsynced), its writes done one of these ways:

- `buffered`: `write` into the page cache, the kernel's writeback left to the fsync;
- `writeback`: as the merge's writer does, writeback started every 64 MiB
  (`sync_file_range`);
- `dontneed`: that, and each 64 MiB already on its way dropped from the page cache once
  written (`posix_fadvise(DONTNEED)`), so the cache does not grow;
- `dontcache`: `pwritev2(RWF_DONTCACHE)` (Linux 6.14+): buffered, but the kernel starts
  writeback at once and drops the pages when written;
- `direct`: O_DIRECT from the page-aligned ring buffers, the tail written after dropping
  O_DIRECT; `staged` copies each write into an aligned buffer first, as a writer whose
  bytes are not aligned (the merge's) would have to.

Every variant writes the same bytes (each buffer's proportional share, rounded down to
4 KiB), so their files' sha256 must agree. Each run is a child process, cold cache,
variants alternated; wall time of the copy, user and system CPU of the child, faults.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.copies import Writer, overlapped_copy
from benchmarks.lanes import timed
from benchmarks.runner import drop_caches
from lazymerge.write.disk import RWF_DONTCACHE, sync_file_range

MODES = ("buffered", "writeback", "dontneed", "dontcache", "direct", "staged")
ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffer addresses in whole blocks
WINDOW = 64 * 2**20  # the writer's writeback granule (write/safetensors.py's WRITEBACK)
SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE
SFR_WAIT_WRITE = 1 | SFR_WRITE | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER


class ModeWriter(Writer):
    """benchmarks/copies.py's writer, its writes done by `mode`."""

    ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffer addresses in whole blocks

    def __init__(self, directory: Path, sizes: list[int], total_in: int, mode: str) -> None:
        self.mode, self.at, self.flushed = mode, 0, 0
        self.stage = memoryview(mmap.mmap(-1, 64 * 2**20)) if mode == "staged" else None
        super().__init__(directory, sizes, total_in)

    def _flags(self) -> int:
        direct = os.O_DIRECT if self.mode in ("direct", "staged") else 0
        return super()._flags() | direct

    def _opened(self) -> None:
        self.at, self.flushed = 0, 0

    def _put(self, data: memoryview) -> int:
        """Write `data` at the file's position by this writer's mode; bytes written."""
        if self.stage is not None:
            self.stage[: len(data)] = data
            data = self.stage[: len(data)]
        tail = len(data) % ALIGN if self.mode in ("direct", "staged") else 0
        done = 0
        while done < len(data) - tail:
            done += self._pwrite(data[done : len(data) - tail], self.at + done)
        if tail:  # a file's last bytes: not a whole block, so through the page cache
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], self.at + done)
        self.at += done
        self._after_write()
        return done

    def _pwrite(self, data: memoryview, at: int) -> int:
        if self.mode == "dontcache":
            return os.pwritev(self.fd, [data], at, RWF_DONTCACHE)
        return os.pwrite(self.fd, data, at)

    def _after_write(self) -> None:
        if self.mode not in ("writeback", "dontneed") or self.at - self.flushed < WINDOW:
            return
        if sync_file_range is None:
            return
        sync_file_range(self.fd, self.flushed, self.at - self.flushed, SFR_WRITE)
        if self.mode == "dontneed" and self.flushed:
            # the window before this one: wait for it on disk, then let its pages go
            sync_file_range(self.fd, 0, self.flushed, SFR_WAIT_WRITE)
            os.posix_fadvise(self.fd, 0, self.flushed, os.POSIX_FADV_DONTNEED)
        self.flushed = self.at


def copy(
    reads: list[list[Any]], sizes: list[int], directory: Path, mode: str, buffer: int
) -> float:
    """Seconds for the overlapped copy with `mode` writes through a ring of `buffer`s."""
    make = functools.partial(ModeWriter, mode=mode)
    return overlapped_copy(reads, sizes, directory, make, buffer)


def child(mode: str, buffer: int, plan_file: Path, directory: Path) -> dict[str, Any]:
    """One copy in this process: its seconds, CPU, faults, and the files' sha256."""
    plan = json.loads(plan_file.read_text())
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = copy(plan["reads"], plan["sizes"], directory, mode, buffer)
    after = resource.getrusage(resource.RUSAGE_SELF)
    digests = [_digest(p) for p in sorted(directory.glob("copy-*.bin"))]
    return {
        "seconds": round(seconds, 3),
        "user": round(after.ru_utime - before.ru_utime, 3),
        "system": round(after.ru_stime - before.ru_stime, 3),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "sha256": digests,
    }


def rounds(
    plan_file: Path, work: Path, variants: list[tuple[str, int]], repeat: int
) -> dict[str, Any]:
    """`repeat` rounds of every variant, each cold, in a child process, alternated."""
    runs: dict[str, list[dict[str, Any]]] = {f"{m}/{b >> 20}": [] for m, b in variants}
    for _ in range(repeat):
        for mode, buffer in variants:
            shutil.rmtree(work / "copy", ignore_errors=True)
            drop_caches()
            cmd = [sys.executable, "-m", "benchmarks.odirect", "--child", mode, str(buffer)]
            cmd += [str(plan_file), str(work / "copy")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[f"{mode}/{buffer >> 20}"].append(json.loads(out))
            print(f"{mode}/{buffer >> 20} {out.strip()}", file=sys.stderr, flush=True)
    shutil.rmtree(work / "copy", ignore_errors=True)
    out_record: dict[str, Any] = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "user", "system")}
        out_record[name] = {**med, "runs": rs}
    return out_record


def merges(recipe: Path, work: Path, repeat: int) -> dict[str, Any]:
    """`repeat` rounds of cold merges of `recipe` with uncached writes off and on
    (LAZYMERGE_DONTCACHE=0/1), alternated: wall, CPU, peak RSS, the shards' sha256."""
    runs: dict[str, list[dict[str, Any]]] = {"0": [], "1": []}
    out = work / "merge-out"
    cmd = [sys.executable, "-m", "lazymerge", "merge", str(recipe), "-o", str(out), "-q"]
    for _ in range(repeat):
        for flag, rs in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            drop_caches()
            run = timed(cmd, {**os.environ, "LAZYMERGE_DONTCACHE": flag})
            run["sha256"] = [_digest(p) for p in sorted(out.glob("*.safetensors"))]
            rs.append(run)
            print(f"merge DONTCACHE={flag} {json.dumps(run)}", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    record: dict[str, Any] = {}
    for flag, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "user", "system")}
        record[f"merge/dontcache={flag}"] = {**med, "runs": rs}
    return record


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def report(record: dict[str, Any]) -> str:
    lines = ["variant (mode/MiB)  median s  user s  sys s  runs s                 same bytes"]
    firsts: dict[str, list[str]] = {}
    for name, v in record["variants"].items():
        runs = ", ".join(f"{r['seconds']:.2f}" for r in v["runs"])
        kind = name.split("/")[0 if name.startswith("merge/") else 1]  # same chunks, same bytes
        first = firsts.setdefault(kind, v["runs"][0]["sha256"])
        same = all(r["sha256"] == first for r in v["runs"])
        lines.append(
            f"{name:18s}  {v['seconds']:8.2f}  {v['user']:6.2f}  {v['system']:5.2f}  {runs:22s} {same}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.odirect", description=__doc__)
    parser.add_argument("recipe", type=Path, nargs="?", help="the merge whose bytes are copied")
    parser.add_argument("--work", type=Path, default=Path("/tmp/odirect"), help="scratch space")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES)
    )
    parser.add_argument("--buffers", default="16", help="ring buffer sizes in MiB (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, help="where to write the record")
    parser.add_argument("--merge", action="store_true",
                        help="also merge RECIPE with LAZYMERGE_DONTCACHE=0 and 1, alternated")  # fmt: skip
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, buffer, plan_file, directory = args.child
        print(json.dumps(child(mode, int(buffer), Path(plan_file), Path(directory))))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    reads = subprocess.run([sys.executable, "-m", "benchmarks.reads", str(args.recipe)],
                           check=True, capture_output=True, text=True).stdout  # fmt: skip
    plan = json.loads(reads)
    plan_file = args.work / "plan.json"
    plan_file.write_text(json.dumps({"reads": plan["reads"], "sizes": [plan["bytes_to_write"]]}))
    modes = [m for m in args.modes.split(",") if m]
    variants = [(m, int(b) * 2**20) for b in args.buffers.split(",") for m in modes]
    record = {"recipe": str(args.recipe), "bytes_read": plan["bytes_to_read"],
              "bytes_written": plan["bytes_to_write"], "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "variants": rounds(plan_file, args.work, variants, max(1, args.repeat)) if variants else {}}  # fmt: skip
    if args.merge:
        record["variants"].update(merges(args.recipe, args.work, max(1, args.repeat)))
    print(report(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
