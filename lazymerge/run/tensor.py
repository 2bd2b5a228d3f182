"""One output tensor's bytes, into its shard's writer: a plain copy of an input's bytes,
or its rows streamed block by block through the tensor's method (lazymerge.meaning.methods).

Memory is bounded by the working budget, not by the tensor: blocks of rows
(budget.block_rows) are computed chunk by chunk in cache on the CPU (budget.chunk_rows),
cast once to the output dtype, queued for the writer, and their input pages released.
On the CPU a block's chunks are shared among compute lanes (device.Lanes) when the
method allows it (budget.tensor_lanes): every chunk is the one a single lane computes,
into its own rows of the block, so the bytes are too. A statistics pass is shared the
same way where its accumulator splits into parts that merge exactly.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from lazymerge.errors import NumericsError
from lazymerge.meaning.methods.base import Keeps, Splittable
from lazymerge.plan.model import COMPUTE, PlannedTensor
from lazymerge.read.mapped import DTYPES, MappedReader
from lazymerge.run import budget as memory
from lazymerge.run.copies import Copier, CopyBuffers, Step
from lazymerge.run.device import Lanes, Scratch
from lazymerge.run.encode import EncodeLane
from lazymerge.run.rows import Factor, Source, TensorBlock
from lazymerge.write.safetensors import ShardWriter


@dataclass
class ShardContext:
    """What writing the tensors of one shard shares: the maps, the writer, the device
    buffers, the budget, the progress callback, and what it found."""

    reader: MappedReader
    writer: ShardWriter | EncodeLane  # a GGUF's writes go through its encoding lane
    scratch: Scratch
    budget: int
    step: Step
    allow_nonfinite: bool = False
    lanes: int = 0  # compute lanes on the CPU; 0: budget.merge_lanes for this process
    nonfinite: list[str] = field(default_factory=list)  # tensors written with NaN/Inf
    source: Source = field(init=False)  # reader and scratch, as the rows of a block need them
    copies: CopyBuffers = field(init=False)  # what plain copies are read into
    _pool: Lanes[Source] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.source = Source(self.reader, self.scratch)
        self.copies = CopyBuffers(self.budget)
        if not self.lanes:
            # This process's share of the cores: a batch worker's torch threads are its
            # share less the writer's core (run.process.compute_threads), so no more.
            self.lanes = memory.merge_lanes(torch.get_num_threads() + 1)
        if self.scratch.whole_blocks:  # a GPU computes whole blocks, one at a time
            self.lanes = 1

    def pool(self) -> Lanes[Source]:
        """The compute lanes, started at their first use: each with its own buffers."""
        if self._pool is None:
            self._pool = Lanes(self.lanes, lambda: Source(self.reader, Scratch()))
        return self._pool

    def close(self) -> None:
        """Stop the lanes, if any started; let the copy buffers' pages go."""
        self.copies.idle()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def write_tensor(ctx: ShardContext, t: PlannedTensor) -> None:
    """Produce one output tensor's bytes into the shard's writer."""
    if t.action == COMPUTE:
        _compute(ctx, t)
    elif t.data is not None:  # CONSTANT: the plan's own bytes
        ctx.writer.write(t.offset, t.data)
        ctx.step(len(t.data))
    else:
        _copy(ctx, t)


def _encode_copy(ctx: ShardContext, t: PlannedTensor) -> None:
    """A GGUF tensor whose values are one input's as they are, re-encoded block by block
    in the lane; nothing is computed here."""
    assert isinstance(ctx.writer, EncodeLane) and t.encoding is not None
    src = t.inputs[0].ref
    rows = memory.encode_copy_rows(t, ctx.budget)
    row_bytes = t.nbytes // t.rows if t.rows else 0
    for r0 in range(0, t.rows, rows):
        r1 = min(r0 + rows, t.rows)
        # A copy of the mapped rows, taken here: this thread (idle otherwise for a copy)
        # waits for the disk and faults the pages in, the lane only encodes. (Reading the
        # map from the lane measured 1.4-1.5x slower, cold; this is at the safetensors
        # merge's time.) The copy is freed once encoded; the map's pages at once.
        rows_copy = ctx.reader.rows(src, r0, r1).clone()
        ctx.reader.release(src, r0 * src.row_nbytes, r1 * src.row_nbytes)
        ctx.writer.write_encoded(t.offset + r0 * row_bytes, rows_copy, t.encoding, t.row_align)
        ctx.step((r1 - r0) * row_bytes)


def _copy(ctx: ShardContext, t: PlannedTensor) -> None:
    """One input's values as they are (the plan copies from exactly one input): its
    bytes, or re-encoded for a GGUF, or a GGUF input's rows decoded."""
    src, e = t.inputs[0].ref, t.encoding
    if e is not None and src.blocks is not None and e.same_blocks(src.blocks):
        _byte_copy(ctx, t)  # a GGUF input's blocks, already what the output holds
    elif e is not None and (not e.copies(t.dtype) or not src.contiguous):
        _encode_copy(ctx, t)
    elif not src.contiguous:
        _decode_copy(ctx, t)
    else:
        _byte_copy(ctx, t)


def _decode_copy(ctx: ShardContext, t: PlannedTensor) -> None:
    """A GGUF input's values into safetensors: its rows decoded, block by block."""
    src = t.inputs[0].ref
    rows = memory.block_rows(t, ctx.budget)
    row_bytes = t.nbytes // t.rows if t.rows else 0
    for r0 in range(0, t.rows, rows):
        r1 = min(r0 + rows, t.rows)
        values = ctx.reader.rows(src, r0, r1)  # a decoded copy, in the output's dtype
        ctx.reader.release(src, r0 * src.row_nbytes, r1 * src.row_nbytes)
        ctx.writer.write(
            t.offset + r0 * row_bytes, values.reshape(-1).view(torch.uint8).numpy().data
        )
        ctx.step((r1 - r0) * row_bytes)


def _byte_copy(ctx: ShardContext, t: PlannedTensor) -> None:
    Copier(ctx.reader, ctx.writer, ctx.budget, ctx.step, ctx.copies).copy(t)


@dataclass(frozen=True)
class _Blocks:
    """How a computed tensor is cut: blocks of `rows` (one output buffer each), computed
    `step` rows at a time."""

    rows: int
    step: int

    def spans(self, r0: int, r1: int) -> list[tuple[int, int]]:
        """The chunks of the block of rows [r0, r1)."""
        return [(c0, min(c0 + self.step, r1)) for c0 in range(r0, r1, self.step)]

    def every_span(self, total: int) -> list[tuple[int, int]]:
        """Every chunk of a tensor of `total` rows, block by block: a statistics pass
        sees the very chunks the writing pass does (a drawn mask is kept by chunk)."""
        return [
            s
            for r0 in range(0, total, self.rows)
            for s in self.spans(r0, min(r0 + self.rows, total))
        ]


def _compute(ctx: ShardContext, t: PlannedTensor) -> None:
    assert t.method is not None  # the plan gives every computed tensor its method
    rows = memory.block_rows(t, ctx.budget)
    lanes = memory.tensor_lanes(t, ctx.budget, ctx.lanes)
    threads = 1 if lanes > 1 else torch.get_num_threads()
    step = rows if ctx.scratch.whole_blocks else memory.chunk_rows(t, rows, threads)
    cut = _Blocks(rows, step)
    factors = [ctx.source.factors(i) for i in t.inputs]
    stats = _stat_passes(ctx, t, factors, cut, lanes)
    row_bytes = t.nbytes // t.rows if t.rows else 0
    for r0 in range(0, t.rows, rows):
        r1 = min(r0 + rows, t.rows)
        out = ctx.scratch.output((r1 - r0, *t.shape[1:]), DTYPES[t.dtype])
        # Chunk by chunk (a multiple of LORA_ROWS), each combined and cast while in cache.
        fill = _Fill(t, factors, stats, out, r0)
        spans = cut.spans(r0, r1)
        if lanes > 1:
            ctx.pool().run(fill, spans)
        else:
            for span in spans:
                fill(ctx.source, span)
        if fill.nonfinite:
            _nonfinite(ctx, t, out, (r0, r1))
        _queue(ctx, t, out, t.offset + r0 * row_bytes)
        ctx.step((r1 - r0) * row_bytes)


@dataclass(frozen=True)
class _Fill:
    """Rows `span` of a block of `t` (its rows from `r0` in `out`): combined by the
    method from the rows a lane's `source` reads, and cast into their place in `out`."""

    t: PlannedTensor
    factors: list[list[Factor]]
    stats: Any
    out: torch.Tensor
    r0: int
    nonfinite: list[tuple[int, int]] = field(default_factory=list)  # spans holding NaN/Inf

    def __call__(self, source: Source, span: tuple[int, int]) -> None:
        assert self.t.method is not None
        c0, c1 = span
        try:
            acc = self.t.method.combine(
                TensorBlock(source, self.t, self.factors, c0, c1), self.stats
            )
        except BaseException:  # no other lane waits on this chunk (select.RankMask)
            self.t.method.abandon(self.stats)
            raise
        rows = self.out[c0 - self.r0 : c1 - self.r0]
        source.scratch.cast(rows, acc)
        if not _finite(rows):  # checked here, while the rows are in this lane's cache
            self.nonfinite.append(span)


def _queue(ctx: ShardContext, t: PlannedTensor, out: torch.Tensor, at: int) -> None:
    """A computed block to its place in the file; its buffer comes back once written."""
    give_back = functools.partial(ctx.scratch.give_back, out)
    if t.encoding is not None:  # a GGUF's: encoded in the lane, beside the next block
        assert isinstance(ctx.writer, EncodeLane)  # run/shard.py gives a GGUF one
        ctx.writer.write_encoded(at, out, t.encoding, t.row_align, after=give_back)
    else:
        view = out.reshape(-1).view(torch.uint8).numpy().data
        ctx.writer.write(at, view, after=give_back)


def _stat_passes(
    ctx: ShardContext, t: PlannedTensor, factors: list[list[Factor]], cut: _Blocks, lanes: int
) -> Any:
    """The method's whole-tensor statistics, from its passes over every chunk (None if it
    takes none); the same chunks the writing pass uses. With `lanes` (budget.tensor_lanes),
    a pass whose accumulator splits (meaning.methods.Splittable) is shared among them: each
    lane feeds its own part, merged back in lane order (integer counts, exact sums: the
    statistics of one lane); any other pass streams the chunks in row order here."""
    assert t.method is not None
    spans = cut.every_span(t.rows)
    stats = None
    for k in range(t.method.stat_passes()):
        acc = t.method.stats_pass(k, stats)
        if isinstance(acc, Keeps):
            acc.room = memory.kept_bytes(t.method, ctx.budget)
        if isinstance(acc, Splittable) and (parts := _parts(acc, lanes, len(spans))):
            ctx.pool().run(_Feed(t, factors, acc, [*parts]), spans)
            for part in parts:
                acc.merge(part)
        else:
            for span in spans:
                acc.update(TensorBlock(ctx.source, t, factors, *span))
        stats = acc.result()
    return stats


def _parts(acc: Splittable, lanes: int, chunks: int) -> list[Any]:
    """One empty part of `acc` per lane, or none where its pass is not shared."""
    if lanes < 2 or chunks < 2 or (first := acc.part()) is None:
        return []
    return [first, *(acc.part() for _ in range(lanes - 1))]


@dataclass
class _Feed:
    """A statistics pass's chunks, each fed by the lane that takes it into that lane's
    own part of the accumulator `acc` (merged back afterwards)."""

    t: PlannedTensor
    factors: list[list[Factor]]
    acc: Any
    free: list[Any]  # parts no lane has taken yet
    taken: dict[int, Any] = field(default_factory=dict)  # id of a lane's Source -> its part
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, source: Source, span: tuple[int, int]) -> None:
        assert self.t.method is not None
        with self.lock:
            if id(source) not in self.taken:
                self.taken[id(source)] = self.free.pop()
            part = self.taken[id(source)]
        try:
            part.update(TensorBlock(source, self.t, self.factors, *span))
        except BaseException:  # no other lane waits on this chunk (select.RankMask)
            self.t.method.abandon(self.acc)
            raise


def _nonfinite(
    ctx: ShardContext, t: PlannedTensor, out: torch.Tensor, span: tuple[int, int]
) -> None:
    """NaN/Inf found in a block: the merge stops, naming the tensor, unless allow_nonfinite."""
    if t.name not in ctx.nonfinite:
        ctx.nonfinite.append(t.name)
    if ctx.allow_nonfinite:
        return
    bad = int((~torch.isfinite(out)).sum())
    ctx.scratch.give_back(out)
    raise NumericsError(
        f"{t.name}: {bad} NaN/Inf values in rows {span[0]}-{span[1] - 1} of the merged tensor "
        f"({t.dtype}: an overflow, or non-finite inputs); --allow-nonfinite writes it anyway"
    )


def _finite(out: torch.Tensor) -> bool:
    """No NaN/Inf in `out`. One min/max pass, no temporaries: NaN propagates into both,
    an Inf is the min or the max (10-40x cheaper than isfinite().all() here)."""
    if not out.is_floating_point() or out.numel() == 0:
        return True
    lo, hi = torch.aminmax(out)
    return math.isfinite(lo) and math.isfinite(hi)
