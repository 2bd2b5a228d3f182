"""run_merge: execute a MergePlan into an output directory, shard after shard.

read -> each tensor's method over fp32 row blocks (adapters applied on the fly) -> one
cast -> the shard writer; memory bounded by the working budget (`max_memory`), not by
the model. The output directory's files are output.py's (lazymerge.write).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from lazymerge.plan.model import MergePlan
from lazymerge.read.maps import MappedFiles
from lazymerge.run.load import TorchLoad
from lazymerge.run.options import MergeOptions
from lazymerge.run.process import peak_rss, tune_process_memory
from lazymerge.run.shard import write_shard
from lazymerge.write.manifest import Record
from lazymerge.write.output import (
    Output,
    check_dir,
    complete_merge,
    output_errors,
    prepare_dir,
)
from lazymerge.write.safetensors import ShardResult


@dataclass(frozen=True)
class MergeResult:
    out: Path
    shards: tuple[ShardResult, ...]  # every shard of the output, kept ones included
    seconds: float
    peak_rss: int  # bytes, the whole process
    bytes_read: int  # by this run (a kept shard's inputs are not read again)
    bytes_written: int  # by this run: kept shards not counted
    kept: tuple[str, ...] = ()  # shards an earlier attempt had completed, left as they were
    nonfinite: tuple[str, ...] = ()  # tensors written with NaN/Inf (allow_nonfinite)
    bytes_kept: int = 0  # the kept shards' bytes
    already_complete: bool = False  # --resume found this merge finished: nothing written


def with_header(plan: MergePlan, name: str) -> MergePlan:
    """A GGUF plan with its header bytes: metadata and tokenizer read, and refused in one
    line if they cannot be written, before the output directory is touched."""
    if plan.recipe.output.format != "gguf":
        return plan
    from lazymerge.write.gguf import gguf_headers

    headers = gguf_headers(plan, name)
    shards = tuple(replace(s, header=h) for s, h in zip(plan.shards, headers, strict=True))
    return replace(plan, shards=shards)


def run_merge(plan: MergePlan, out: Path, options: MergeOptions | None = None) -> MergeResult:
    """Write the merged model described by `plan` into directory `out`.

    With `options.resume`, an output that already holds this very merge, complete, is left
    as it is (`already_complete`); an interrupted one keeps its intact shards.
    """
    opts = options or MergeOptions()
    start = time.monotonic()
    tune_process_memory()
    with TorchLoad() as loading:
        if opts.device not in ("cpu", "auto"):  # refuse a missing GPU before the output is touched
            _check_device(loading, opts.device)
        return _run(plan, out, opts, loading, start)


def _check_device(loading: TorchLoad, name: str) -> None:
    loading.wait()
    from lazymerge.run.device import resolve_device  # torch is in now

    resolve_device(name)


def _run(
    plan: MergePlan, out: Path, opts: MergeOptions, loading: TorchLoad, start: float
) -> MergeResult:
    plan = with_header(plan, out.expanduser().resolve().name)
    path = check_dir(out, plan.recipe.inputs())
    record = Record(plan)
    done = complete_merge(path, plan, record) if opts.resume else None
    if done is not None:
        names = tuple(s.name for s in done)
        return MergeResult(
            path, tuple(done), time.monotonic() - start, peak_rss(), 0, 0, names,
            bytes_kept=sum(s.size for s in done), already_complete=True,
        )  # fmt: skip
    path = prepare_dir(path, plan.recipe.inputs(), opts.overwrite, opts.resume)
    with output_errors(path):
        output = Output(path, plan, record)
        kept = output.start(opts.resume)
        results, nonfinite = _write_shards(output, opts, kept, loading)
        output.finish(results, opts.card, nonfinite)
    todo = [s for s in plan.shards if s.name not in kept]
    return MergeResult(
        path,
        tuple(results),
        time.monotonic() - start,
        peak_rss(),
        sum(ref.nbytes for s in todo for t in s.tensors for ref in t.reads()),
        sum(s.size for s in results if s.name not in kept),
        tuple(s.name for s in results if s.name in kept),
        tuple(nonfinite),
        bytes_kept=sum(s.size for s in kept.values()),
    )


def _write_shards(
    output: Output, opts: MergeOptions, kept: dict[str, ShardResult], loading: TorchLoad
) -> tuple[list[ShardResult], list[str]]:
    plan = output.plan
    results: list[ShardResult] = []
    nonfinite: list[str] = []
    with (
        MappedFiles() as files,
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
            result, bad = write_shard(shard, output.path, files, opts, bar.update, loading)
            results.append(result)
            nonfinite += bad
            output.progress(results)
    return results, nonfinite
