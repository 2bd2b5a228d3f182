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
from typing import Any

import numpy as np
import torch

from lazymerge.meaning.gguf_types import row_bytes
from lazymerge.plan.model import Encoding
from lazymerge.write.safetensors import ShardWriter

CHUNK = 4 * 2**20  # bytes of float32 values encoded at once


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
        x = flat[r0 : r0 + step].to(torch.float32)
        if e.heads:
            x = permute_heads(x, head_rows)
        out[r0 : r0 + step] = encode(np.ascontiguousarray(x.numpy()), e.qtype)
    return out


def permute_heads(x: torch.Tensor, head_rows: int) -> torch.Tensor:
    """llama.cpp's rotary layout: within each head, the rows of its first half and its
    second half interleaved (row i of the half a -> 2i + a). Its converter undoes the
    permutation Hugging Face's conversion applied to the original Llama weights."""
    half = head_rows // 2
    return x.reshape(-1, 2, half, x.shape[-1]).transpose(1, 2).reshape(x.shape)


class EncodeLane:
    """A GGUF shard's writer, seen through one thread that encodes blocks: the next block
    is computed while this one is encoded (on the other core), and every write reaches
    the shard writer in the order it was made (offsets must arrive in order). Blocks in
    flight are bounded by the scratch's output buffers, which come back once encoded."""

    def __init__(self, writer: ShardWriter) -> None:
        self._writer = writer
        self._tasks: queue.Queue[Callable[[], object] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="encode", daemon=True)
        self._thread.start()

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
        after: Callable[[], object],
    ) -> None:
        """Encode `rows` and write the bytes; `after` once they are written: the block's
        buffer comes back only then, so the scratch's two output buffers bound the encoded
        bytes in flight too (the writer's queue would otherwise hold 64 MiB more)."""

        def task() -> None:
            self._writer.write(offset, encode_rows(rows, e, head_rows).data, after)

        self._put(task)

    def close(self) -> None:
        """Wait for every queued write; raise what went wrong in the lane, if anything."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _put(self, task: Callable[[], object]) -> None:
        if self._error is not None:
            raise self._error
        self._tasks.put(task)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            if self._error is None:  # after a failure, tasks are only let go
                try:
                    task()
                except BaseException as e:
                    self._error = e
