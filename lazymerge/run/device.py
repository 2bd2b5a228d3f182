"""Where the arithmetic runs: the device (`--device`), the block buffers on it, and on
the CPU the lanes that share a block's chunks.

On the CPU the executor computes each block in cache-sized chunks of rows, in reused host
buffers, spread over compute lanes (threads of one torch thread each, their own buffers);
on a GPU, whole blocks in reused device buffers fed through one pinned staging buffer,
with the cast to the output dtype done on the device before the (smaller) bytes come down.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import torch

from lazymerge.errors import MachineError, RecipeError


class Scratch:
    """Work buffers (a chunk's on the CPU, a block's on a GPU) reused from block to block
    and tensor to tensor, on the device that does the arithmetic.

    A fresh buffer per block is a fresh mmap (see tune_process_memory): the kernel
    faults in and zeroes every page of it, which cost as much as the upcast itself.
    Two output buffers (host memory, pinned for a GPU) alternate: one is filled while
    the writer's threads still hash and write the other (`give_back` returns it from there).
    With a GPU, mapped input rows go through one pinned staging buffer on their way up.
    """

    OUTPUTS = 2

    def __init__(self, device: torch.device | None = None, staged: bool | None = None) -> None:
        self.device = device or torch.device("cpu")
        # The accelerator's way (staging buffer, cast before the copy down); `staged`
        # forces it on the CPU, where tests check it writes the same bytes.
        self._gpu = self.device.type != "cpu" if staged is None else staged
        self._work: dict[str, torch.Tensor] = {}
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()  # data_ptr of a free one
        self._outputs: dict[int, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Slot `slot`'s buffer ("base", "other"), on the device: the same memory each time."""
        return self._take(slot, shape, dtype, self.device)

    def _take(
        self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        flat = self._work.get(slot)
        if flat is None or flat.numel() < nbytes:
            self._work.pop(slot, None)  # let the old one go before the larger one comes
            flat = self._work[slot] = self._empty(nbytes, device)
        return flat[:nbytes].view(dtype).view(shape)

    def _empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        pin = self.device.type == "cuda" and device.type == "cpu"
        return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)

    def fill(self, dst: torch.Tensor, rows: torch.Tensor) -> None:
        """dst <- mapped `rows` (converted to dst's dtype)."""
        if not self._gpu:
            dst.copy_(rows)
            return
        stage = self._take("stage", tuple(rows.shape), rows.dtype, torch.device("cpu"))
        stage.copy_(rows)  # from the map into pinned memory: the page faults happen here
        dst.copy_(stage)  # up, then converted on the device

    def put(
        self, rows: torch.Tensor, dtype: torch.dtype | None = None, copy: bool = False
    ) -> torch.Tensor:
        """Small inputs (LoRA factors, B rows, magnitudes) on the device, as `dtype`: a
        copy when anything changes or `copy`, else the mapped view itself."""
        return rows.to(device=self.device, dtype=dtype or rows.dtype, copy=copy)

    @property
    def whole_blocks(self) -> bool:
        """Whether blocks are computed whole (a GPU: fewer, larger transfers and kernels)
        rather than in cache-sized chunks (the CPU)."""
        return self._gpu

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A free host buffer for a block's output (waiting for the writer to release one
        if need be); fill it with `cast`."""
        nbytes = math.prod(shape) * dtype.itemsize
        if len(self._outputs) < self.OUTPUTS and self._free.empty():
            flat = self._empty(nbytes, torch.device("cpu"))
        else:
            flat = self._outputs.pop(self._free.get())
            if flat.numel() < nbytes:
                del flat  # let the old one go before the larger one comes
                flat = self._empty(nbytes, torch.device("cpu"))
        self._outputs[flat.data_ptr()] = flat
        return flat[:nbytes].view(dtype).view(shape)

    def cast(self, dst: torch.Tensor, acc: torch.Tensor) -> None:
        """dst (part of an `output`) <- `acc` in dst's dtype. One rounding, IEEE
        round-to-nearest-even on either device; a GPU casts first and sends the smaller
        bytes down."""
        dst.copy_(acc.to(dst.dtype) if self._gpu else acc)

    def give_back(self, out: torch.Tensor) -> None:
        """`out` (from `output`) is written, or abandoned: its buffer may be reused."""
        self._free.put(out.data_ptr())

    def trim(self) -> None:
        """Let the output buffers go, once the writer has given them all back: what
        follows (plain copies) needs none, and they would double a copy's memory."""
        for _ in self._outputs:
            self._free.get()
        self._outputs.clear()


S = TypeVar("S")  # what a lane keeps: its own buffers


class _Batch:
    """One `Lanes.run` call: its function, what is left to do, the first failure."""

    def __init__(self, fn: Callable[[Any, Any], object], items: int) -> None:
        self.fn = fn
        self.left = items
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            self.error = self.error or error
            self.left -= 1
            if self.left == 0:
                self.cond.notify_all()


class Lanes(Generic[S]):
    """`n` threads that run the items of one call at once, each with its own state
    (`make()`: a lane's buffers) and one torch thread: torch releases the GIL inside its
    kernels, so the lanes' upcasts, products, blends and casts (and the page faults of
    their mapped reads) run on as many cores. Items are taken in the order given, each by
    whichever lane is free, so the lanes move through the maps side by side.

    torch's intra-op thread count is per thread (OpenMP's and MKL's settings, taken from
    a process-wide default when a thread first computes): each lane sets its own to 1,
    and the caller's, and that default, are as they were once the lanes have started.
    """

    def __init__(self, n: int, make: Callable[[], S]) -> None:
        before = torch.get_num_threads()
        self._items: queue.SimpleQueue[tuple[_Batch, Any] | None] = queue.SimpleQueue()
        ready = threading.Barrier(n + 1)
        self._threads = [
            threading.Thread(target=self._lane, args=(make, ready), name=f"lane {k}", daemon=True)
            for k in range(n)
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()
        ready.wait()
        torch.set_num_threads(before)  # the default the lanes' setting changed

    def run(self, fn: Callable[[S, Any], object], items: Iterable[Any]) -> None:
        """fn(state, item) for every item, spread over the lanes; returns when all are
        done, raising the first failure (the items after it are skipped)."""
        todo = list(items)
        if not todo:
            return
        batch = _Batch(fn, len(todo))
        for item in todo:
            self._items.put((batch, item))
        with batch.cond:
            batch.cond.wait_for(lambda: batch.left == 0)
        if batch.error is not None:
            raise batch.error

    def _lane(self, make: Callable[[], S], ready: threading.Barrier) -> None:
        # A thread takes the process-wide default at its first parallel call, whatever it
        # set before: make that call, then set this lane's own.
        torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            state = make()
        except BaseException:
            ready.abort()  # the caller's wait raises BrokenBarrierError, not waits forever
            raise
        ready.wait()
        while (job := self._items.get()) is not None:
            batch, item = job
            error = None
            if batch.error is None:
                try:
                    batch.fn(state, item)
                except BaseException as e:  # handed to the caller's thread
                    error = e
            batch.finish(error)

    def close(self) -> None:
        for _ in self._threads:
            self._items.put(None)
        for thread in self._threads:
            thread.join()

    def __len__(self) -> int:
        return len(self._threads)


def parse_device(name: str) -> torch.device | None:
    """The device `name` says (None for `auto`), or a RecipeError."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RecipeError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return device


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (a GPU when there is one, else the CPU), checked
    against this machine."""
    device = parse_device(name) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "with" if torch.version.cuda else "without"
            raise MachineError(
                f"--device {name}: no CUDA GPU here (torch {torch.__version__}, built {built} "
                "CUDA); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MachineError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)"
            )
    return device
