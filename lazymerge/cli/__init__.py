"""The command line: a thin click shell (commands.py, flags.py); `main` maps every
expected failure to one line on stderr and an exit status."""

from __future__ import annotations

import os
import signal

import click

from lazymerge.cli.commands import cli
from lazymerge.errors import LazyMergeError

__all__ = ["cli", "main"]


INTERRUPTED = (
    "lazymerge: interrupted; the output is incomplete (.partial shards, no index); "
    "run the same command with --resume to continue"
)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: the same clean, resumable path


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and a non-zero exit."""
    debug = bool(os.environ.get("LAZYMERGE_DEBUG"))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rc = cli.main(args=argv, prog_name="lazymerge", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt (Ctrl-C)
        if debug:
            raise
        click.echo(INTERRUPTED, err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except LazyMergeError as e:
        if debug:
            raise
        click.echo(f"lazymerge: error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo(INTERRUPTED, err=True)
        return 130
    except OSError as e:  # not one we anticipated and named: still one line
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"lazymerge: error: {e.strerror or e}{where}", err=True)
        return 1
    return rc if isinstance(rc, int) else 0
