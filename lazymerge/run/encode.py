"""A GGUF tensor's bytes from a block of its rows (plan/gguf.py decided how): the
values, exactly as the safetensors output would hold them, to float32, Q and K rows
permuted within each head as llama.cpp's converter does, then encoded in the tensor's
type by write/quants.py (llama.cpp's reference bytes).

A block is encoded a few MiB at a time: the quantizers' temporaries (several float32
copies of what they are given) stay that small whatever the block's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from lazymerge.meaning.gguf import row_order
from lazymerge.meaning.gguf_types import row_bytes
from lazymerge.plan.model import Encoding
from lazymerge.run.budget import ENCODE_LANES
from lazymerge.write.safetensors import ShardWriter

CHUNK = 4 * 2**20  # bytes of float32 values encoded at once
_Item = Callable[[], object]  # a write to make, in order (an encoded one waits for its lane)


def encode_rows(rows: torch.Tensor, e: Encoding, head_rows: int) -> np.ndarray:
    """Bytes of `rows` (a block starting at a multiple of `head_rows` when permuted)."""
    from lazymerge.write.quants import encode  # gguf-py: only a GGUF merge needs it

    flat = rows.reshape(rows.shape[0], -1)
    n, columns = flat.shape
    step = max(1, CHUNK // (4 * columns))
    if e.heads:  # whole heads at a time
        step = max(head_rows, step // head_rows * head_rows)
    out = np.empty((n, row_bytes(columns, e.qtype)), np.uint8)
    for r0 in range(0, n, step):
        x = flat[r0 : r0 + step]
        if e.shift:  # Gemma's +1: in float16 for a float16 tensor, as llama.cpp's converter
            x = (x if x.dtype == torch.float16 else x.to(torch.float32)) + e.shift
        x = x.to(torch.float32)
        if e.heads:
            x = permute_heads(x, head_rows)
        out[r0 : r0 + step] = encode(np.ascontiguousarray(x.numpy()), e.qtype)
    return out


def permute_heads(x: torch.Tensor, head_rows: int) -> torch.Tensor:
    """llama.cpp's rotary layout (meaning/gguf.row_order) of whole heads of `head_rows`
    rows: within each head, the rows of its first half and its second half interleaved.
    Its converter undoes the permutation Hugging Face's conversion applied to the
    original Llama weights."""
    return x[torch.from_numpy(row_order(x.shape[0], x.shape[0] // head_rows))]


class EncodeLane:
    """A GGUF shard's writer, seen through ENCODE_LANES threads that encode blocks: the
    next blocks are computed (or mapped) while earlier ones are encoded, on the other
    cores, and a feeder hands every write to the shard writer in the order it was made
    (offsets must arrive in order). Blocks in flight: the lanes' and a queue of
    ENCODE_LANES + 1 (budget.working_memory counts them)."""

    def __init__(self, writer: ShardWriter) -> None:
        self._writer = writer
        self._pool = ThreadPoolExecutor(ENCODE_LANES, thread_name_prefix="encode")
        self._order: queue.Queue[_Item | None] = queue.Queue(maxsize=ENCODE_LANES + 1)
        self._error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, name="encode-feed", daemon=True)
        self._feeder.start()

    def write(self, offset: int, data: Any, after: Callable[[], object] | None = None) -> None:
        self._put(lambda: self._writer.write(offset, data, after))

    def copy(
        self,
        offset: int,
        source: tuple[int, int],
        data: Any,
        after: Callable[[], object] | None = None,
    ) -> None:
        self._put(lambda: self._writer.copy(offset, source, data, after))

    def write_encoded(
        self,
        offset: int,
        rows: torch.Tensor,
        e: Encoding,
        head_rows: int,
        after: Callable[[], object] | None = None,
    ) -> None:
        """Encode `rows` in a lane and write the bytes in turn; `after` once they are
        written: the block's buffer comes back only then, so the scratch's output buffers
        bound the encoded bytes in flight too (None: `rows` is a copy, freed with it)."""
        done = self._pool.submit(encode_rows, rows, e, head_rows)
        self._put(lambda: self._writer.write(offset, done.result().data, after))

    def close(self) -> None:
        """Wait for every queued write; raise what went wrong in a lane, if anything."""
        if self._feeder.is_alive():
            self._order.put(None)
            self._feeder.join()
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def _put(self, item: _Item) -> None:
        if self._error is not None:
            raise self._error
        self._order.put(item)

    def _feed(self) -> None:
        while (item := self._order.get()) is not None:
            if self._error is None:  # after a failure, items are only let go
                try:
                    item()
                except BaseException as e:
                    self._error = e
