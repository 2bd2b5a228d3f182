"""One benchmark run per layer count: generate, merge, copy baseline, mergekit, compare."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks import mergekit
from benchmarks.copies import overlapped_copy, read_fd
from benchmarks.host import steal_share, stolen

# The founding recipe: gradient 0.9 -> 0 over the first 25 of 40 layers, LoRA weight 0.25.
RATIOS = (0.9, 0.0)
LORA_WEIGHT = 0.25
FOUNDING_SPAN, FOUNDING_LAYERS = 25, 40
BUFFER = 16 * 2**20


@dataclass(frozen=True)
class Child:
    seconds: float
    peak_rss: int  # bytes: the child's own maximum resident set (wait4)
    stdout: str
    cpu_seconds: float = 0.0  # the child's user + system CPU (wait4)
    steal: float | None = None  # share of all cores the host took meanwhile (host.py)


def run_child(cmd: list[str], what: str) -> Child:
    """Run a command to completion, timing it and reading its peak RSS with wait4.

    The orchestrator never imports torch, so the ru_maxrss a child inherits across exec
    (Linux keeps the parent's high-water mark) is far below what a merge uses itself.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start, stolen_before = time.monotonic(), stolen()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - start
        steal = steal_share(stolen_before, stolen(), seconds)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed ({proc.returncode}): {err.read().strip()[-1500:]}")
        cpu = usage.ru_utime + usage.ru_stime
        return Child(seconds, usage.ru_maxrss * 1024, out.read(), cpu, steal)


def steal_pct(child: Child) -> float | None:
    """The host's steal during a child's run, percent of all cores (None: not known)."""
    return None if child.steal is None else round(100 * child.steal, 1)


def drop_caches(enabled: bool = True) -> bool:
    """Flush and drop the page cache (root on Linux); False when the machine won't."""
    if not enabled:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def fresh_models(work: Path, layers: int, tiny: bool = False) -> Child:
    """`work` emptied, then base, other and LoRA with `layers` 13B-shaped layers (a few
    MB with `tiny`) generated in it; the generator's run (its peak RSS is recorded)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "benchmarks.generate", str(work), "--layers", str(layers)]
    return run_child(cmd + (["--tiny"] if tiny else []), "generate")


def span_for(layers: int) -> int:
    """The founding span [0, 25) of 40 layers, scaled (at least one layer)."""
    return max(1, round(FOUNDING_SPAN * layers / FOUNDING_LAYERS))


def write_recipe(work: Path, layers: int) -> Path:
    recipe = {
        "base": "base",
        "other": {"model": "other", "loras": [{"path": "lora", "weight": LORA_WEIGHT}]},
        "gradient": {"values": list(RATIOS), "layers": [0, span_for(layers)]},
        "output": {"dtype": "float16", "shard_size": "2GB"},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@dataclass(frozen=True)
class CopyTimes:
    """The copy baseline's two phases: reading the ranges, then writing and fsyncing."""

    read: float
    write: float

    @property
    def seconds(self) -> float:
        return self.read + self.write


def copy_baseline(reads: list[list[Any]], out_sizes: list[int], directory: Path) -> CopyTimes:
    """Seconds to read the merge's input ranges and write its output sizes, plain file I/O.

    Reads go through one reusable buffer; each output file is written in full and
    fsynced, as the merge's shards are. The phases are timed apart: which of the two
    the disk is slow at, on the day, says how far a merge can overlap them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    start = time.monotonic()
    fds: dict[str, int] = {}
    try:
        for file, offset, length in reads:
            fd = read_fd(fds, file)
            while length > 0:
                n = os.preadv(fd, [view[: min(length, BUFFER)]], offset)
                if n <= 0:
                    raise RuntimeError(f"{file}: short read at {offset}")
                offset, length = offset + n, length - n
        read_done = time.monotonic()
        for k, size in enumerate(out_sizes):
            with open(directory / f"copy-{k}.bin", "wb") as f:
                while size > 0:
                    size -= f.write(view[: min(size, BUFFER)])
                f.flush()
                os.fsync(f.fileno())
    finally:
        for fd in fds.values():
            os.close(fd)
    return CopyTimes(read_done - start, time.monotonic() - read_done)


def run_layers(
    layers: int,
    cache: Path,
    *,
    tiny: bool,
    with_mergekit: bool,
    keep: bool,
    cold: bool = True,
    repeat: int = 1,
) -> dict[str, Any]:
    """Everything measured for one layer count; the work directory is removed afterwards.

    The merge and the copy run `repeat` times, alternately; their medians are reported.
    """
    py = sys.executable
    work = cache / f"layers-{layers}"
    try:
        gen = fresh_models(work, layers, tiny)
        recipe = write_recipe(work, layers)
        plan = json.loads(run_child([py, "-m", "benchmarks.reads", str(recipe)], "plan").stdout)
        drop_caches(cold)
        # What a merge pays before its first byte: interpreter + imports, as the command does.
        startup = run_child([py, "-m", "lazymerge", "--version"], "import")
        dropped, merges, copies, overlapped = True, [], [], []
        for _ in range(repeat):  # interleaved, so that the disk's drifts hit both alike
            shutil.rmtree(work / "out", ignore_errors=True)
            dropped = drop_caches(cold) and dropped
            merges.append(run_child(
                [py, "-m", "lazymerge", "merge", str(recipe), "-o", str(work / "out"), "-q"],
                "lazymerge merge",
            ))  # fmt: skip
            out_sizes = [p.stat().st_size for p in sorted((work / "out").glob("*.safetensors"))]
            dropped = drop_caches(cold) and dropped
            copies.append(copy_baseline(plan["reads"], out_sizes, work / "copy"))
            shutil.rmtree(work / "copy")
            dropped = drop_caches(cold) and dropped
            overlapped.append(overlapped_copy(plan["reads"], out_sizes, work / "copy"))
            shutil.rmtree(work / "copy")
        merge_s = statistics.median(m.seconds for m in merges)
        copy_s = statistics.median(c.seconds for c in copies)
        overlapped_s = statistics.median(overlapped)
        result: dict[str, Any] = {
            "layers": layers,
            "span": span_for(layers),
            "cache": "cold" if dropped else "warm",
            "bytes_read": plan["bytes_to_read"],
            "bytes_written": sum(out_sizes),
            "generator_peak_rss": gen.peak_rss,
            "startup_seconds": startup.seconds,
            "merge_seconds": merge_s,  # the median of `repeat` runs
            "merge_peak_rss": max(m.peak_rss for m in merges),
            "copy_seconds": copy_s,
            "merge_over_copy": merge_s / copy_s,
            "merge_runs": [round(m.seconds, 3) for m in merges],
            # what each merge ran on: its CPU-seconds, and the host's steal meanwhile
            "merge_cpu_runs": [round(m.cpu_seconds, 2) for m in merges],
            "merge_steal_runs": [steal_pct(m) for m in merges],
            "copy_runs": [round(c.seconds, 3) for c in copies],
            # the copy's phases, medians: what the disk reads and writes at on the day
            "copy_read_seconds": statistics.median(c.read for c in copies),
            "copy_write_seconds": statistics.median(c.write for c in copies),
            # the honest baseline (benchmarks/copies.py): reads and writes overlapped
            "overlapped_copy_seconds": overlapped_s,
            "merge_over_overlapped": merge_s / overlapped_s,
            "overlapped_runs": [round(s, 3) for s in overlapped],
        }
        if with_mergekit:
            result["mergekit"] = _mergekit(work, layers, cache, cold)
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _mergekit(work: Path, layers: int, cache: Path, cold: bool) -> dict[str, Any]:
    exe, why = mergekit.ensure_mergekit(cache)
    if exe is None:
        return {"error": why}
    cfg = mergekit.config(
        work / "base", work / "other", work / "lora",
        layers=layers, span=span_for(layers), ratios=RATIOS, lora_weight=LORA_WEIGHT,
    )  # fmt: skip
    cfg_file = work / "mergekit.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    drop_caches(cold)
    try:
        run = run_child(
            mergekit.command(exe, cfg_file, work / "mk-out", work / "mk-lora-cache"), "mergekit"
        )
    except RuntimeError as e:
        return {"error": str(e)}
    diff = json.loads(
        run_child(
            [sys.executable, "-m", "benchmarks.compare", str(work / "out"), str(work / "mk-out")],
            "compare",
        ).stdout
    )
    return {"seconds": run.seconds, "peak_rss": run.peak_rss, "diff": diff}
