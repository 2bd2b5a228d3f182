"""Executes a MergePlan: read -> fp32 blend + LoRA in place -> one cast -> write.

Memory is bounded by the working budget (`max_memory`), not by the model: each tensor
is processed in blocks of rows, the input pages of a block are released as soon as it
is written, and nothing is buffered beyond the block being computed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lazymerge.device import Scratch, resolve_device
from lazymerge.errors import NumericsError, OutputError
from lazymerge.index import DTYPES, MappedReader, TensorRef, itemsize
from lazymerge.lora import LORA, LORA_T, REPLACE, LoraTerm
from lazymerge.manifest import MANIFEST, Record, ShardResult, completed_shards
from lazymerge.plan import COMPUTE, COPY_BASE, MergePlan, PlannedTensor, Shard
from lazymerge.readahead import ReadAhead
from lazymerge.writer import ShardWriter, finalize_output, prepare_output, write_json

DEFAULT_MAX_MEMORY = 512 * 2**20
# Plain copies move at most this much per step, so the mapped input pages a copy makes
# resident stay small even when the budget is large.
COPY_CHUNK = 64 * 2**20
# Bytes queued for the writer's threads (hash, pwrite) while the next block is computed;
# a block larger than this still goes, alone.
WRITE_QUEUE = 64 * 2**20
# Row quantum of the LoRA products (see block_rows); also the smallest row block, so a
# --max-memory below ~64 rows of the widest tensor is exceeded by that much.
LORA_ROWS = 64
# VmHWM of `python -c "import lazymerge.engine"` (Python 3.11, torch 2.13 CPU, x86-64 Linux):
# 221-233 MiB measured; what a merge costs before its first tensor.
INTERPRETER = 240 * 2**20
# fp32 bytes per torch thread of one chunk of rows blended at once on the CPU (see
# chunk_rows): about what a core's L2 cache holds.
CACHE_CHUNK = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# What a term needs whole, read once per tensor: (A, B.T) in fp32; None for REPLACE.
Factor = tuple[torch.Tensor, torch.Tensor] | None
Step = Callable[[int], object]  # progress: called with the bytes just written


@dataclass(frozen=True)
class MergeOptions:
    max_memory: int = DEFAULT_MAX_MEMORY
    overwrite: bool = False  # replace a previous merge's files
    resume: bool = False  # keep the shards an interrupted attempt completed
    progress: bool = True
    allow_nonfinite: bool = False  # write NaN/Inf results instead of stopping
    device: str = "cpu"  # where the arithmetic runs: cpu, cuda, cuda:N or auto
    # Adds files (the model card) once the shards are complete, before the index.
    before_index: Callable[[Path], None] | None = None


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
    out = prepare_output(out, plan.recipe.inputs(), opts.overwrite, opts.resume)
    with output_errors(out), torch_threads(compute_threads()):
        record, kept = open_record(plan, out, opts.resume)
        results, nonfinite = _write_shards(plan, out, opts, kept, record)
        extra = {"nonfinite": nonfinite} if nonfinite else {}
        finalize_output(out, plan, record.data(results, complete=True, **extra), opts.before_index)
    return MergeResult(
        out,
        tuple(results),
        time.monotonic() - start,
        peak_rss(),
        plan.bytes_to_read,
        sum(s.size for s in results),
        tuple(kept),
        tuple(nonfinite),
    )


def open_record(
    plan: MergePlan, out: Path, resume: bool, record: Record | None = None
) -> tuple[Record, dict[str, ShardResult]]:
    """Write the first, incomplete manifest into the prepared `out`.

    Returns the merge's record and the shards an earlier attempt completed (`resume`).
    """
    record = record or Record(plan)
    kept = completed_shards(out, plan, record) if resume else {}
    # The first record: fingerprints to resume against, even if shard 1 never ends.
    write_json(out / MANIFEST, record.data(list(kept.values()), complete=False))
    return record, kept


@contextlib.contextmanager
def output_errors(out: Path, again: str = "run the same command with --resume") -> Iterator[None]:
    """An OSError while writing becomes one OutputError line that says what to do."""
    try:
        yield
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(
            f"writing {out}: {what}; the output is incomplete (.partial shards, no index); "
            f"fix that and {again}"
        ) from e


def tune_process_memory() -> None:
    """Ask glibc to serve every buffer of 1 MiB or more from mmap, and so hand it back to
    the OS when freed. Its default threshold adapts to past frees, which leaves freed
    block buffers in the heap at random and made peak RSS jump by a tensor or two.

    Also moves every object alive now (torch's module graph, the plan) out of the
    garbage collector's sight: its full collections, triggered by the loop's small
    allocations, traversed them again and again (~4 % of a merge's time in a profile).
    """
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)


def compute_threads(jobs: int = 1) -> int:
    """torch threads for each of `jobs` merging processes: the cores this process may
    use, less one left to the writer's threads (sha256, pwrite) and the kernel's page
    cache work, never more than torch would take on its own.

    The CPU computes in cache-sized chunks (see chunk_rows), too small for a thread team
    to pay on two cores: one thread there measured faster, in wall and CPU time.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(torch.get_num_threads(), (cores or 1) // jobs - 1))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then back to what they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_shards(
    plan: MergePlan, out: Path, opts: MergeOptions, kept: dict[str, ShardResult], record: Record
) -> tuple[list[ShardResult], list[str]]:
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
            result, bad = write_shard(shard, out, reader, opts, bar.update)
            results.append(result)
            nonfinite += bad
            write_json(out / MANIFEST, record.data(results, complete=False))
    return results, nonfinite


def write_shard(
    shard: Shard, out: Path, reader: MappedReader, opts: MergeOptions, step: Step
) -> tuple[ShardResult, list[str]]:
    """Write one output shard, complete and renamed, from the plan alone: its bytes do not
    depend on which shards were written before it, or where (see lazymerge.batch).

    Returns its record and the tensors written with NaN/Inf (allow_nonfinite).
    """
    nonfinite: list[str] = []
    (out / shard.name).unlink(missing_ok=True)  # a stale or damaged earlier copy
    writer = ShardWriter(out, shard, inflight=WRITE_QUEUE)
    scratch = Scratch(resolve_device(opts.device))
    reads = [(t, t.reads()) for t in shard.tensors]
    try:
        with ReadAhead([r for _, refs in reads for r in refs], opts.max_memory) as ahead:
            for t, refs in reads:
                if t.action != COMPUTE:
                    scratch.trim()
                if not write_tensor(
                    t, reader, writer, scratch, opts.max_memory, step, opts.allow_nonfinite
                ):
                    nonfinite.append(t.name)
                reader.release_touched()
                for r in refs:
                    ahead.used(r)
        return writer.finish(), nonfinite
    except BaseException:
        writer.abort()
        raise


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's VmHWM belongs to this process image alone; getrusage's ru_maxrss survives
    exec and so reports the parent's size when a large process started us.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_tensor(
    t: PlannedTensor,
    reader: MappedReader,
    writer: ShardWriter,
    scratch: Scratch,
    budget: int,
    step: Step,
    allow_nonfinite: bool = False,
) -> bool:
    """Produce one output tensor's bytes into the writer, block by block.

    Returns False when a computed tensor holds NaN/Inf and `allow_nonfinite` let it through.
    """
    if t.action == COMPUTE:
        return _compute(t, reader, writer, scratch, budget, step, allow_nonfinite)
    src = t.base if t.action == COPY_BASE else t.other
    assert src is not None  # the plan only copies from a side it has
    _copy(src, t.offset, reader, writer, min(budget, COPY_CHUNK), step)
    return True


def _copy(
    src: TensorRef, offset: int, reader: MappedReader, writer: ShardWriter, chunk: int, step: Step
) -> None:
    chunk = max(chunk, 1)
    for start in range(0, src.nbytes, chunk):
        stop = min(start + chunk, src.nbytes)
        # The kernel copies file to file; the writer's hash thread reads the mapped bytes,
        # then drops their pages.
        release = functools.partial(reader.release, src, start, stop)
        source = (reader.fd(src.file), src.offset + start)
        writer.copy(offset + start, source, reader.raw(src, start, stop), after=release)
        step(stop - start)


def _per_row(t: PlannedTensor) -> int:
    """Working bytes per row of a computed tensor: two fp32 rows, the output row, and the
    mapped input rows."""
    row_numel = t.nbytes // itemsize(t.dtype) // t.rows if t.rows else 0
    per_row = row_numel * (4 + 4 + itemsize(t.dtype)) + t.base.row_nbytes
    return per_row + (t.other.row_nbytes if t.other is not None else 0)


def block_rows(t: PlannedTensor, budget: int) -> int:
    """Rows per block so that the block's buffers and mapped input pages fit `budget`
    (with a GPU, whose fp32 rows are whole blocks; the CPU's are chunks, and it holds less).

    Always a multiple of LORA_ROWS (or the whole tensor), so that every LoRA product is
    computed over the same row chunks whatever the budget.
    """
    rows = budget // max(_per_row(t), 1) // LORA_ROWS * LORA_ROWS
    return max(1, min(t.rows, max(rows, LORA_ROWS)))


def chunk_rows(t: PlannedTensor, rows: int) -> int:
    """Rows blended at a time within a block of `rows` on the CPU: about CACHE_CHUNK of
    fp32 per torch thread, a multiple of LORA_ROWS, so that the upcast, products, blend
    and cast of a chunk run in cache rather than each streaming a whole block through
    memory. Element-wise arithmetic and fixed LoRA chunks: the bytes do not depend on it."""
    width = max(t.nbytes // itemsize(t.dtype) // max(t.rows, 1), 1)
    fit = CACHE_CHUNK * torch.get_num_threads() // (4 * width)
    return min(rows, max(LORA_ROWS, fit // LORA_ROWS * LORA_ROWS))


def working_memory(t: PlannedTensor, budget: int) -> int:
    """Bytes of buffers and mapped input pages held at once while writing `t` on the CPU."""
    if t.action != COMPUTE:
        return 2 * min(budget, COPY_CHUNK, t.nbytes)  # one chunk queued, the next mapped
    rows = block_rows(t, budget)
    chunk = chunk_rows(t, rows)
    # Two output blocks (one filled, one queued for the writer), and one chunk's fp32
    # rows and mapped input rows.
    total = 2 * rows * (t.nbytes // max(t.rows, 1)) + chunk * _per_row(t)
    for lo in t.base_loras + t.other_loras:
        if lo.kind == REPLACE:
            total += chunk * lo.a.row_nbytes * 2  # mapped rows, and an fp32 copy at most
        else:  # the whole factors in fp32, and this chunk's B rows (mapped and fp32)
            total += sum(r.nbytes // itemsize(r.dtype) * 4 for r in lo.refs())
            total += chunk * lo.rank * 4 * 2
    return total


def estimate_peak(plan: MergePlan, budget: int) -> int:
    """Expected peak RSS of `lazymerge merge`: interpreter and torch, plus the largest
    working set of any one tensor."""
    return INTERPRETER + max((working_memory(t, budget) for t in plan.tensors), default=0)


def _compute(
    t: PlannedTensor,
    reader: MappedReader,
    writer: ShardWriter,
    scratch: Scratch,
    budget: int,
    step: Step,
    allow_nonfinite: bool,
) -> bool:
    rows = block_rows(t, budget)
    step_rows = rows if scratch.whole_blocks else chunk_rows(t, rows)
    base_a = _factors(t.base_loras, reader, scratch)
    other_a = _factors(t.other_loras, reader, scratch)
    row_bytes = t.nbytes // t.rows if t.rows else 0
    finite = True
    for r0 in range(0, t.rows, rows):
        r1 = min(r0 + rows, t.rows)
        out = scratch.output((r1 - r0, *t.shape[1:]), DTYPES[t.dtype])
        # Chunk by chunk (a multiple of LORA_ROWS), each blended and cast while in cache.
        for c0 in range(r0, r1, step_rows):
            c1 = min(c0 + step_rows, r1)
            acc = blend_rows(t, reader, c0, c1, base_a, other_a, scratch)
            scratch.cast(out[c0 - r0 : c1 - r0], acc)
        if not _finite(out):
            finite = False
            if not allow_nonfinite:
                bad = int((~torch.isfinite(out)).sum())
                scratch.give_back(out)
                raise NumericsError(
                    f"{t.name}: {bad} NaN/Inf values in rows {r0}-{r1 - 1} of the merged tensor "
                    f"({t.dtype}: an overflow, or non-finite inputs); --allow-nonfinite writes "
                    "it anyway"
                )
        view = out.reshape(-1).view(torch.uint8).numpy().data
        writer.write(
            t.offset + r0 * row_bytes, view, after=functools.partial(scratch.give_back, out)
        )
        step((r1 - r0) * row_bytes)
    return finite


def _finite(out: torch.Tensor) -> bool:
    """No NaN/Inf in `out`. One min/max pass, no temporaries: NaN propagates into both,
    an Inf is the min or the max (10-40x cheaper than isfinite().all() here)."""
    if not out.is_floating_point() or out.numel() == 0:
        return True
    lo, hi = torch.aminmax(out)
    return math.isfinite(lo) and math.isfinite(hi)


def blend_rows(
    t: PlannedTensor,
    reader: MappedReader,
    r0: int,
    r1: int,
    base_a: Sequence[Factor],
    other_a: Sequence[Factor],
    scratch: Scratch,
) -> torch.Tensor:
    """fp32 rows [r0, r1) of `(1 - r) * base' + r * other'` (' = with its LoRAs), in a
    scratch buffer valid until the next call.

    Rows the other model lacks (a smaller vocabulary) are the base's alone.
    """
    shared = max(0, min(r1, t.shared_rows) - r0) if t.other is not None else 0
    acc = None
    if t.ratio < 1 or shared < r1 - r0:
        acc = _side(t.base, t.base_loras, base_a, reader, r0, r1, scratch, "base")
        if t.ratio != 0 and shared:
            acc[:shared].mul_(1 - t.ratio)
    if t.ratio > 0 and shared:
        assert t.other is not None  # the plan resolves `other` whenever ratio > 0
        theirs = _side(t.other, t.other_loras, other_a, reader, r0, r0 + shared, scratch, "other")
        if t.ratio != 1:
            theirs.mul_(t.ratio)
        if acc is None:
            acc = theirs
        elif t.ratio == 1:
            acc[:shared].copy_(theirs)
        else:
            acc[:shared].add_(theirs)
    assert acc is not None
    return acc


def _side(
    ref: TensorRef,
    terms: Sequence[LoraTerm],
    factors: Sequence[Factor],
    reader: MappedReader,
    r0: int,
    r1: int,
    scratch: Scratch,
    slot: str,
) -> torch.Tensor:
    """fp32 copy of rows [r0, r1) of one model's tensor with its adapters applied in place.

    (A non-float tensor, which the plan never blends, keeps its own dtype.)
    """
    dtype = torch.float32 if ref.is_float else DTYPES[ref.dtype]
    acc = scratch.take(slot, (r1 - r0, *ref.shape[1:]), dtype)
    scratch.fill(acc, reader.rows(ref, r0, r1))  # a copy: the mapped view is read-only
    reader.release(ref, r0 * ref.row_nbytes, r1 * ref.row_nbytes)
    for term, factor in zip(terms, factors, strict=True):
        if factor is None:
            _replace(acc, term, reader, r0, r1, scratch)
        else:
            _add_delta(acc, term, factor, reader, r0, r1, scratch)
        if term.magnitude is not None:  # DoRA: rescale each row to its magnitude
            m = scratch.put(reader.rows(term.magnitude, r0, r1), torch.float32)
            acc.mul_((m / acc.norm(dim=1)).unsqueeze(1))
    return acc


def _replace(
    acc: torch.Tensor, term: LoraTerm, reader: MappedReader, r0: int, r1: int, scratch: Scratch
) -> None:
    """W <- W + weight * (S - W): S itself at weight 1."""
    new = scratch.put(reader.rows(term.a, r0, r1))
    if term.scale == 1:
        acc.copy_(new)
    else:
        acc.mul_(1 - term.scale).add_(new.to(torch.float32, copy=True).mul_(term.scale))
    reader.release(term.a, r0 * term.a.row_nbytes, r1 * term.a.row_nbytes)


def _add_delta(
    acc: torch.Tensor,
    term: LoraTerm,
    factor: tuple[torch.Tensor, torch.Tensor],
    reader: MappedReader,
    r0: int,
    r1: int,
    scratch: Scratch,
) -> None:
    """acc += scale * (B @ A)[r0:r1] (or its transpose), in place, no full-size delta.

    A GEMM's rounding depends on its row count, so the product always runs over the
    same LORA_ROWS chunks whatever the block size.
    """
    if term.kind == LORA:
        assert term.b is not None
        lhs = scratch.put(reader.rows(term.b, r0, r1), torch.float32)  # B rows [n, r]
        rhs = factor[0]  # A [r, in]
    else:  # (B @ A).T rows r0:r1 = A[:, r0:r1].T @ B.T
        lhs, rhs = factor[0][:, r0:r1].T, factor[1]
    for q in range(0, r1 - r0, LORA_ROWS):
        acc[q : q + LORA_ROWS].addmm_(lhs[q : q + LORA_ROWS], rhs, alpha=term.scale)
    if term.kind == LORA and term.b is not None:
        reader.release(term.b, r0 * term.b.row_nbytes, r1 * term.b.row_nbytes)


def _factors(terms: Sequence[LoraTerm], reader: MappedReader, scratch: Scratch) -> list[Factor]:
    """Per term, what is read once per tensor in fp32: A (LORA), A and B.T (LORA_T)."""
    out: list[Factor] = []
    for term in terms:
        if term.kind == REPLACE or term.b is None:
            out.append(None)
            continue
        a = scratch.put(reader.rows(term.a, 0, term.a.rows), torch.float32, copy=True)
        bt = (
            scratch.put(reader.rows(term.b, 0, term.b.rows), torch.float32, copy=True).T
            if term.kind == LORA_T
            else a
        )
        out.append((a, bt))
        reader.release(term.a)
    return out
