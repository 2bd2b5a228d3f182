"""The memory model: how many rows a block and a cache chunk hold under `--max-memory`,
and the working set (and so the peak RSS) that gives; and how many compute lanes share
them. `lazymerge plan` prints the same estimate the executor lives by."""

from __future__ import annotations

import math
import mmap
import os

from lazymerge.meaning.adapters import REPLACE
from lazymerge.meaning.methods import Method
from lazymerge.plan.model import COMPUTE, MergePlan, PlannedTensor
from lazymerge.read.tensorref import TensorRef, itemsize

DEFAULT_MAX_MEMORY = 512 * 2**20
PAGE = mmap.PAGESIZE
# Bytes queued for the writer's threads (hash, pwrite) while the next block is computed;
# a block larger than this still goes, alone.
WRITE_QUEUE = 64 * 2**20
# Plain copies move at most this much per step (read into one of the copy buffers,
# run/copies.py, or a map's pages), so what a copy holds stays small even when the budget
# is large; as many buffers as fill the writer's queue, each back once written and hashed.
COPY_CHUNK = 8 * 2**20
# A GGUF's blocks: every tensor is computed (a copy is re-encoded), and a block costs
# the same per byte at any size past a few MiB, so larger ones would only add memory.
ENCODED_BLOCKS = 96 * 2**20
# A GGUF tensor copied from its input is read (copied out of the map) this much at a
# time: the blocks in flight between the reading thread and the lane are copies.
ENCODE_COPY_BLOCK = 8 * 2**20
# Threads encoding a GGUF's blocks (run/encode.py): the k-quants are CPU-bound.
ENCODE_LANES = 1  # 2 measured: q4_k_m 8 % faster, q8_0 no faster, +100 MiB peak
# The encoding lane's own: a 4 MiB float32 chunk (run/encode.py) and the quantizer's
# copies of it.
ENCODE_TEMPS = 5 * 4 * 2**20
# Row quantum of the LoRA products (see block_rows); also the smallest row block, so a
# --max-memory below ~64 rows of the widest tensor is exceeded by that much.
LORA_ROWS = 64
# VmHWM of `python -c "import lazymerge.run.merge"` (Python 3.11, torch 2.13 CPU, x86-64
# Linux): 221-233 MiB measured; what a merge costs before its first tensor.
INTERPRETER = 240 * 2**20
# fp32 bytes per torch thread of one chunk of rows blended at once on the CPU (see
# chunk_rows): about what a core's L2 cache holds.
CACHE_CHUNK = 2**20
# Compute lanes at most (run/device.py Lanes: threads blending a block's chunks at once,
# one torch thread each). Each holds one chunk's buffers (a few MiB); past the disk's
# read rate more would only wait. LAZYMERGE_LANES=N overrides the default.
MAX_LANES = 8
# fp32 rows an N-model method holds per row of a chunk, per input: each input's upcast
# rows (a buffer reused from chunk to chunk) and the method's temporaries (task vectors,
# stacked, masks, sign votes, sums). Measured with torch's profiler over one chunk, 4
# inputs (ties, dare_ties, della, breadcrumbs, task_arithmetic; fp16 and fp32 configs):
# temporaries 6.3-11.5 rows, so 1 + 11.5 / 4 per input at most; slerp's 2 inputs 2.5.
METHOD_ROWS = 4
# Mapped input pages around the rows a lane reads, per input: the kernel maps whole
# page-cache folios (readahead makes them up to a few MiB) on a fault, wider than the
# chunk released after it. 8.5-16 MiB per input on two lanes, measured (smaps of a
# 13B-shaped TIES merge, Linux 6.18, ext4); counted for N-model methods.
MAPPED_AROUND = 4 * 2**20
# A lane's part of a statistics pass, per input at most: select.OrderStats' histograms of
# bit patterns (2^15 int64, then 2^16 per cut, two cuts) and bincount's own copy of one.
STAT_PART = 2 * 2**20


def kept_room(budget: int) -> int:
    """Bytes a tensor's statistics passes may keep for its writing pass (Method.held_bytes:
    DARE's drawn masks, 61.5 MiB for a 13B embedding's three inputs): a quarter of the
    budget; what does not fit is computed again."""
    return budget // 4


def kept_bytes(method: Method | None, budget: int) -> int:
    """What `method`'s statistics passes keep for the writing pass under `budget`: all it
    declares (Method.held_bytes) where that fits kept_room, else nothing. The executor
    grants it (base.Keeps.room) and the estimate counts it, by this one rule."""
    held = method.held_bytes() if method is not None else 0
    return held if held <= kept_room(budget) else 0


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system says)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def _per_row(t: PlannedTensor) -> int:
    """Working bytes per row of a computed tensor: fp32 rows (two for the founding blend;
    an N-model method's, METHOD_ROWS per input), the output row, and the mapped input rows."""
    row_numel = t.row_numel
    fp32_rows = 2 if t.call is None else METHOD_ROWS * len(t.inputs)
    # a GGUF's encoded rows besides: a block being encoded, and one queued for the writer
    encoded = 2 * (t.nbytes // t.rows) if t.encoding is not None and t.rows else 0
    return (
        row_numel * (4 * fp32_rows + itemsize(t.dtype))
        + sum(read_row_bytes(i.ref) for i in t.inputs)
        + encoded
    )


def read_row_bytes(ref: TensorRef) -> int:
    """Bytes one row of an input holds while read: its mapped bytes; a GGUF tensor's
    also gathered (permuted rows) and decoded, with the dequantizer's float32 temporaries."""
    if ref.blocks is None:
        return ref.row_nbytes
    return 2 * ref.row_nbytes + 3 * 4 * (ref.numel // max(ref.rows, 1))


def copy_chunk(budget: int) -> int:
    """Bytes a plain copy moves per step, within `budget`."""
    return max(min(budget, COPY_CHUNK), PAGE)


def copy_buffers(budget: int) -> int:
    """How many copy buffers (of copy_chunk bytes) may be in flight at once: the
    writer's queue's worth, within `budget`, and at least two (one read while one is
    written)."""
    return max(2, min(WRITE_QUEUE, budget) // copy_chunk(budget))


def block_rows(t: PlannedTensor, budget: int) -> int:
    """Rows per block so that the block's buffers and mapped input pages fit `budget`
    (with a GPU, whose fp32 rows are whole blocks; the CPU's are chunks, and it holds less).

    Always a multiple of LORA_ROWS (or the whole tensor), so that every LoRA product is
    computed over the same row chunks whatever the budget.
    """
    unit = math.lcm(LORA_ROWS, t.row_align)
    if t.encoding is not None:  # a GGUF computes every tensor, the embeddings too
        budget = min(budget, ENCODED_BLOCKS)
    rows = budget // max(_per_row(t), 1) // unit * unit
    return max(1, min(t.rows, max(rows, unit)))


def encode_copy_rows(t: PlannedTensor, budget: int) -> int:
    """Rows per block of a GGUF tensor re-encoded from its input (run/tensor.py): a copy
    of ENCODE_COPY_BLOCK of mapped rows at a time (each block in flight is one), within
    block_rows' budget, whole heads and LoRA row quanta as ever."""
    unit = math.lcm(LORA_ROWS, t.row_align)
    fit = ENCODE_COPY_BLOCK // max(read_row_bytes(t.inputs[0].ref), 1) // unit * unit
    return max(1, min(block_rows(t, budget), max(fit, unit)))


def chunk_rows(t: PlannedTensor, rows: int, threads: int) -> int:
    """Rows blended at a time within a block of `rows` on the CPU: about CACHE_CHUNK of
    fp32 for each of torch's `threads`, so that the upcast, products, blend and cast of a
    chunk run in cache rather than each streaming a whole block through memory. A
    multiple of LORA_ROWS where an input has adapters (their products run over fixed
    LORA_ROWS chunks), else any count: an N-model method's temporaries, a dozen rows or
    more, stay near CACHE_CHUNK each however wide the rows (64 rows of a 13B down_proj
    were 3.4 MiB each: TIES peaked at 490 MiB, not 395, and ran 10-15 % slower).
    Element-wise arithmetic, statistics by flat index, fixed LoRA chunks: the bytes do
    not depend on it."""
    width = max(t.row_numel, 1)
    unit = LORA_ROWS if any(i.terms for i in t.inputs) else 1
    fit = CACHE_CHUNK * threads // (4 * width)
    return min(rows, max(unit, fit // unit * unit))


def merge_threads() -> int:
    """The torch threads a merge will compute with (run.process.compute_threads: a core
    left to the writer), as far as it is known without importing torch (whose own
    count, its ceiling, is about the cores): `lazymerge plan` estimates with it."""
    return max(1, usable_cores() - 1)


def merge_lanes(most: int | None = None) -> int:
    """Compute lanes a merge runs: LAZYMERGE_LANES if set, else the cores this process may
    use, at most MAX_LANES and at most `most` (a process's share of a machine)."""
    chosen = os.environ.get("LAZYMERGE_LANES", "").strip()
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, min(MAX_LANES, usable_cores(), most or MAX_LANES))


def tensor_lanes(t: PlannedTensor, budget: int, lanes: int) -> int:
    """Lanes that compute `t`'s chunks on the CPU, in its statistics passes (those whose
    accumulator splits) and its writing pass: all `lanes` when a block holds more than one
    chunk and its method allows it (no statistics pass, or `blocks_at_once`: every method
    here); else 1, the main thread's (a method that says nothing sees every block in row
    order, and may carry counters from one to the next)."""
    if lanes < 2 or t.action != COMPUTE or t.method is None:
        return 1
    if t.method.stat_passes() and not t.method.blocks_at_once:
        return 1
    rows = block_rows(t, budget)
    return lanes if chunk_rows(t, rows, 1) < rows else 1


def working_memory(t: PlannedTensor, budget: int, threads: int, lanes: int = 1) -> int:
    """Bytes of buffers and mapped input pages held at once while writing `t` on the CPU
    with `threads` torch threads, or `lanes` compute lanes (tensor_lanes)."""
    if t.data is not None:
        return t.nbytes
    if t.action != COMPUTE and (t.encoding is not None or not t.inputs[0].ref.contiguous):
        return _encoded_copy(t, budget)
    if t.action != COMPUTE:  # the copy buffers it fills (the map's pages, the same or less)
        chunk = copy_chunk(budget)
        return min(copy_buffers(budget), -(-t.nbytes // chunk)) * chunk
    work = _computed(t, budget, threads, tensor_lanes(t, budget, lanes))
    if t.encoding is not None:  # the lanes' float32 chunks and the quantizer's copies
        return work + ENCODE_LANES * ENCODE_TEMPS
    return work


def _encoded_copy(t: PlannedTensor, budget: int) -> int:
    """A GGUF tensor re-encoded from its input's map, or a GGUF input's rows decoded
    into safetensors (run/tensor.py): blocks of mapped rows and their encoded bytes (one
    in each lane, ENCODE_LANES + 1 queued), the writer's queue, the lanes' temporaries."""
    rows = encode_copy_rows(t, budget)
    per_row = read_row_bytes(t.inputs[0].ref) + t.nbytes // max(t.rows, 1)
    blocks = 2 * ENCODE_LANES + 2  # (and the one being copied out of the map)
    return blocks * rows * per_row + WRITE_QUEUE + ENCODE_LANES * ENCODE_TEMPS


def _computed(t: PlannedTensor, budget: int, threads: int, lanes: int) -> int:
    """A computed tensor's working set, with `lanes` lanes (1: the main thread's)."""
    rows = block_rows(t, budget)
    chunk = chunk_rows(t, rows, 1 if lanes > 1 else threads)
    # Two output blocks (one filled, one queued for the writer), and each lane's chunk
    # of fp32 rows and mapped input rows.
    row_out = t.row_numel * itemsize(t.dtype)  # the values, and a GGUF's encoded row too
    row_out += t.nbytes // max(t.rows, 1) if t.encoding is not None else 0
    total = 2 * rows * row_out + lanes * chunk * _per_row(t)
    if t.call is not None:  # (the founding blend's two inputs: within its estimate's error)
        total += lanes * len(t.inputs) * MAPPED_AROUND
    total += kept_bytes(t.method, budget)  # what its statistics passes keep for the writing pass
    if lanes > 1 and t.method is not None and t.method.stat_passes():
        total += lanes * len(t.inputs) * STAT_PART  # each lane's part of a statistics pass
    for term in (term for i in t.inputs for term in i.terms):
        if term.kind == REPLACE:  # mapped rows, and an fp32 copy at most
            total += lanes * chunk * term.a.row_nbytes * 2
        else:  # the whole factors in fp32 (shared), and each chunk's B rows (mapped, fp32)
            total += sum(r.numel * 4 for r in term.refs())
            total += lanes * chunk * term.rank * 4 * 2
    return total


def estimate_peak(
    plan: MergePlan, budget: int, threads: int | None = None, lanes: int | None = None
) -> int:
    """Expected peak RSS of `lazymerge merge`: interpreter and torch, plus the largest
    working set of any one tensor (computed with `threads`, default merge_threads(), or
    `lanes`, default merge_lanes())."""
    threads = merge_threads() if threads is None else threads
    lanes = merge_lanes() if lanes is None else lanes
    working = (working_memory(t, budget, threads, lanes) for t in plan.tensors)
    return INTERPRETER + max(working, default=0)


def least_effective_budget(plan: MergePlan) -> int:
    """The smallest `--max-memory` every computed tensor's row block fits in. A block never
    has fewer than LORA_ROWS rows (or the whole tensor, when shorter), so a budget below
    this is exceeded by the widest such block, whatever it says."""
    return max(
        (min(t.rows, LORA_ROWS) * _per_row(t) for t in plan.tensors if t.action == COMPUTE),
        default=0,
    )
