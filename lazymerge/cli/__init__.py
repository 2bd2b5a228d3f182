"""The command line: a thin click shell (commands.py, flags.py); `main` maps every
expected failure to one line on stderr and an exit status."""

from __future__ import annotations

import os
import signal

import click

from lazymerge.cli.commands import Terminated, cli, interrupt_status
from lazymerge.errors import LazyMergeError

__all__ = ["cli", "main"]


INTERRUPTED = (
    "lazymerge: interrupted; the output is incomplete (.partial shards, no index); "
    "run the same command with --resume to continue"
)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated  # SIGTERM stops like Ctrl-C: the same clean, resumable path


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and a non-zero exit
    (Ctrl-C 130, SIGTERM 143: 128 + the signal, as a shell reports a process it killed)."""
    debug = bool(os.environ.get("LAZYMERGE_DEBUG"))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rc = cli.main(args=argv, prog_name="lazymerge", standalone_mode=False)
    except click.exceptions.Abort as e:  # click's form of KeyboardInterrupt (and SIGTERM)
        if debug:
            raise
        click.echo(INTERRUPTED, err=True)
        return interrupt_status(e.__cause__ or e)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except LazyMergeError as e:
        if debug:
            raise
        click.echo(f"lazymerge: error: {e}", err=True)
        return 1
    except KeyboardInterrupt as e:
        if debug:
            raise
        click.echo(INTERRUPTED, err=True)
        return interrupt_status(e)
    except OSError as e:  # not one we anticipated and named: still one line
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"lazymerge: error: {e.strerror or e}{where}", err=True)
        return 1
    return rc if isinstance(rc, int) else 0
