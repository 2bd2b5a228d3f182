"""torch for a merge: imported on a thread of its own while the merge's first plain
copies are written (run/shard.py), its threads then set for the merge and put back after.

A merge needs only headers to plan and only the writer to copy bytes; torch's import
(~1.5-2 s, a quarter of a 2-layer 13B-shaped merge) would otherwise come before the
first byte.
"""

from __future__ import annotations

import gc
import sys
import threading
from types import TracebackType
from typing import Self

from lazymerge.run import process

# What the computing side imports (torch with it); imported once on the loading thread.
COMPUTE_MODULES = ("lazymerge.read.mapped", "lazymerge.run.tensor", "lazymerge.run.encode")


class TorchLoad:
    """Use as a context: `wait()` before the first computed tensor (or any use of torch);
    the merge's torch threads are set then, and restored on exit."""

    def __init__(self) -> None:
        self.started = "torch" not in sys.modules  # False: in already, nothing to hide
        self._error: BaseException | None = None
        self._threads: int | None = None  # torch's own count, to put back
        self._thread = threading.Thread(target=self._load, name="import torch", daemon=True)
        if self.started:
            self._thread.start()

    def _load(self) -> None:
        # The collector off while torch's million objects are made (see __main__): ~10 %
        # of the import; wait() then freezes them.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for name in COMPUTE_MODULES:
                __import__(name)
        except BaseException as e:  # raised in the merge's thread, by wait()
            self._error = e
        finally:
            if collecting:
                gc.enable()

    def wait(self) -> None:
        """Block until torch is in; the first call sets this merge's torch threads."""
        if self.started:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._threads is None:
            import torch

            gc.freeze()  # torch's module graph out of the collector's sight (process.py)
            self._threads = torch.get_num_threads()
            torch.set_num_threads(process.compute_threads(self._threads))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.started:
            self._thread.join()
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
