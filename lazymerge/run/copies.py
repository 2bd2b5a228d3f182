"""Plain byte copies: a tensor whose output bytes are one input's, as they are, handed
to the shard writer chunk by chunk; a shard's copies on a lane of their own. No torch:
they run while torch is still being imported (run/load.py), then beside the arithmetic."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lazymerge.plan.model import COMPUTE, PlannedTensor
from lazymerge.read.maps import MappedFiles
from lazymerge.read.readahead import ReadAhead
from lazymerge.run.budget import COPY_CHUNK
from lazymerge.write.safetensors import ShardWriter

Step = Callable[[int], object]  # progress: called with the bytes just written
# A copy written ahead is hashed later, by the writer's other thread, while the next
# bytes are written: in pieces this small, the pages of both stay few (64 MiB pieces
# held ~40 MiB more at the peak, 13B-shaped, 2 layers).
AHEAD_CHUNK = 8 * 2**20
After = Callable[[], object] | None


class Sink(Protocol):
    """Where copies go: a ShardWriter, or a GGUF's encoding lane (run/encode.py)."""

    def copy(
        self, offset: int, source: tuple[int, int], data: memoryview, after: After = None
    ) -> None: ...


def is_byte_copy(t: PlannedTensor) -> bool:
    """Whether a safetensors output's tensor is its input's bytes as they are (no
    arithmetic, no decoding, no encoding)."""
    return (
        t.action != COMPUTE
        and t.data is None
        and t.encoding is None
        and t.inputs[0].ref.contiguous
        and t.inputs[0].ref.blocks is None
    )


@dataclass(frozen=True)
class Copier:
    """Byte copies from the input maps into one shard's writer."""

    files: MappedFiles
    writer: Sink
    budget: int  # bytes: a copy's chunks are at most this (and COPY_CHUNK)
    step: Step

    def copy(self, t: PlannedTensor) -> None:
        """`t`'s bytes, chunk by chunk, in order."""
        self._chunks(t, self.writer.copy, COPY_CHUNK)

    def copy_ahead(self, t: PlannedTensor) -> None:
        """`t`'s bytes before the bytes in front of them (ShardWriter.copy_ahead)."""
        assert isinstance(self.writer, ShardWriter)  # a GGUF writes in order, via its lane
        self._chunks(t, self.writer.copy_ahead, AHEAD_CHUNK)

    def _chunks(self, t: PlannedTensor, put: Callable[..., None], most: int) -> None:
        src = t.inputs[0].ref
        chunk = max(min(self.budget, most), 1)
        for start in range(0, src.nbytes, chunk):
            stop = min(start + chunk, src.nbytes)
            # The kernel copies file to file, or the writer writes from the map; its hash
            # thread reads the mapped bytes, then drops their pages.
            release = functools.partial(self.files.release, src, start, stop)
            source = (self.files.fd(src.file), src.offset + start)
            put(t.offset + start, source, self.files.raw(src, start, stop), release)
            self.step(stop - start)


class CopyLane:
    """A shard's plain copies on a thread of their own (reserved in the writer first),
    written ahead while the merge's own thread imports torch and computes the rest, so
    that the disk copies while the cores compute. Its own read-ahead, the copier's budget
    ahead."""

    def __init__(self, copier: Copier, tensors: list[PlannedTensor]) -> None:
        assert isinstance(copier.writer, ShardWriter)
        self._writer = copier.writer
        for t in tensors:
            self._writer.reserve(t.offset, t.nbytes)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(copier, tensors), name="copies", daemon=True
        )
        self._thread.start()

    def _run(self, copier: Copier, tensors: list[PlannedTensor]) -> None:
        try:
            with ReadAhead([r for t in tensors for r in t.reads()], copier.budget) as reads:
                for t in tensors:
                    copier.copy_ahead(t)
                    for r in t.reads():
                        reads.used(r)
        except BaseException as e:  # the merge's thread raises it (join), or its own
            self._error = e
            self._writer.fail(e)  # nothing waits for bytes that will not come

    def join(self) -> None:
        """Wait for the copies to be queued; raise what stopped them."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self, error: BaseException) -> None:
        """The merge failed: the lane stops at its next write (the writer raises)."""
        self._writer.fail(error)
        self._thread.join()
