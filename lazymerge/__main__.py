"""The `lazymerge` command (and `python -m lazymerge`)."""

import gc
import os
import sys


def main() -> int:
    # numpy's OpenBLAS starts a spinning thread per core at import, for matrix products
    # lazymerge never asks numpy for (torch does its own): one thread, unless set.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Importing torch makes about a million objects, which the garbage collector would
    # traverse again and again while they are made (~10 % of start-up), and once more
    # after: they live as long as the process, so out of its sight they go.
    gc.disable()
    try:
        from lazymerge.cli import main as run
    finally:
        gc.freeze()
        gc.enable()
    return run()


if __name__ == "__main__":
    sys.exit(main())
