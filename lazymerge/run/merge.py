"""run_merge: execute a MergePlan into an output directory, shard after shard.

read -> each tensor's method over fp32 row blocks (adapters applied on the fly) -> one
cast -> the shard writer; memory bounded by the working budget (`max_memory`), not by
the model. The output directory's files are output.py's (lazymerge.write).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lazymerge.plan.model import MergePlan
from lazymerge.read.mapped import MappedReader
from lazymerge.run.device import resolve_device
from lazymerge.run.options import MergeOptions
from lazymerge.run.process import compute_threads, peak_rss, torch_threads, tune_process_memory
from lazymerge.run.shard import write_shard
from lazymerge.write.manifest import Record
from lazymerge.write.output import Output, output_errors, prepare_dir
from lazymerge.write.safetensors import ShardResult


@dataclass(frozen=True)
class MergeResult:
    out: Path
    shards: tuple[ShardResult, ...]
    seconds: float
    peak_rss: int  # bytes, the whole process
    bytes_read: int
    bytes_written: int
    kept: tuple[str, ...] = ()  # shards an earlier attempt had completed
    nonfinite: tuple[str, ...] = ()  # tensors written with NaN/Inf (allow_nonfinite)


def run_merge(plan: MergePlan, out: Path, options: MergeOptions | None = None) -> MergeResult:
    """Write the merged model described by `plan` into directory `out`."""
    opts = options or MergeOptions()
    resolve_device(opts.device)  # refuse a missing GPU before the output is touched
    start = time.monotonic()
    tune_process_memory()
    path = prepare_dir(out, plan.recipe.inputs(), opts.overwrite, opts.resume)
    with output_errors(path), torch_threads(compute_threads()):
        output = Output(path, plan, Record(plan))
        kept = output.start(opts.resume)
        results, nonfinite = _write_shards(output, opts, kept)
        output.finish(results, opts.card, nonfinite)
    return MergeResult(
        path,
        tuple(results),
        time.monotonic() - start,
        peak_rss(),
        plan.bytes_to_read,
        sum(s.size for s in results),
        tuple(kept),
        tuple(nonfinite),
    )


def _write_shards(
    output: Output, opts: MergeOptions, kept: dict[str, ShardResult]
) -> tuple[list[ShardResult], list[str]]:
    plan = output.plan
    results: list[ShardResult] = []
    nonfinite: list[str] = []
    with (
        MappedReader() as reader,
        tqdm(
            total=plan.bytes_to_write, unit="B", unit_scale=True, unit_divisor=1024,
            desc="merging", disable=not opts.progress, file=sys.stderr,
        ) as bar,
    ):  # fmt: skip
        for shard in plan.shards:
            if shard.name in kept:
                results.append(kept[shard.name])
                bar.update(shard.data_size)
                continue
            result, bad = write_shard(shard, output.path, reader, opts, bar.update)
            results.append(result)
            nonfinite += bad
            output.progress(results)
    return results, nonfinite
