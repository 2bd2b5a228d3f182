"""Thin click shell: parse, build a Recipe, plan, run, map errors to one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from lazymerge import __version__
from lazymerge.engine import DEFAULT_MAX_MEMORY, run_merge
from lazymerge.errors import LazyMergeError, RecipeError
from lazymerge.plan import build_plan
from lazymerge.recipe import Recipe, load_recipe, parse_dtype, parse_recipe, parse_size
from lazymerge.report import summary


def _output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every writing command shares."""
    options = [
        click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
                     help="Output model directory (created if missing)."),
        click.option("--dtype", help="Output dtype: float16, bfloat16 or float32 (default: the recipe's, else the base's)."),
        click.option("--shard-size", help="Largest output shard, e.g. 2GB, 500MiB (default 2GB)."),
        click.option("--max-memory", default=None,
                     help=f"Working-buffer budget, e.g. 512MiB (default {DEFAULT_MAX_MEMORY // 2**20}MiB); "
                     "larger tensors are processed in row blocks (of at least 64 rows)."),
        click.option("--overwrite", is_flag=True, help="Replace the merge files of a non-empty output directory."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lazymerge")
def cli() -> None:
    """Merge LLM checkpoints in one streaming pass: LoRAs on the fly, layer gradients,
    memory bounded by a few tensors."""


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_output_options
def merge(recipe: Path, **opts: Any) -> None:
    """Run the merge a RECIPE (YAML) describes.

    Example: lazymerge merge examples/airolima-chronos.yaml -o ./airolima-chronos
    """
    _run(load_recipe(recipe), **opts)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--weight", type=float, default=1.0, show_default=True, help="Multiplier of the LoRA delta."
)
@_output_options
def lora(base: Path, adapter: Path, weight: float, **opts: Any) -> None:
    """Merge one PEFT LoRA ADAPTER into BASE at --weight.

    Example: lazymerge lora ./airoboros-13b ./limarp-lora -o ./airolima --weight 0.25
    """
    data = {"base": {"model": str(base), "loras": [{"path": str(adapter), "weight": weight}]}}
    _run(parse_recipe(data, Path.cwd(), "lora"), **opts)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("other", type=click.Path(path_type=Path))
@click.option("--values", required=True, help="Ratios of OTHER at the anchors, e.g. 0.9,0.")
@click.option(
    "--layers", help="Layer span start:end (end exclusive), e.g. 0:25; default all layers."
)
@click.option(
    "--rest",
    default="0",
    show_default=True,
    help="Ratio of OTHER outside the span and outside the layers.",
)
@_output_options
def gradient(
    base: Path, other: Path, values: str, layers: str | None, rest: str, **opts: Any
) -> None:
    """Blend OTHER into BASE with a layer gradient (BlockMerge_Gradient's flags).

    Example: lazymerge gradient ./chronos-13b ./airolima -o ./out --values 0.9,0 --layers 0:25
    """
    rule: dict[str, Any] = {
        "values": _floats(values, "--values"),
        "rest": _floats(rest, "--rest")[0],
    }
    if layers is not None:
        rule["layers"] = layers
    data = {"base": str(base), "other": str(other), "gradient": rule}
    _run(parse_recipe(data, Path.cwd(), "gradient"), **opts)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise RecipeError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def _run(
    recipe: Recipe,
    *,
    out: Path,
    dtype: str | None,
    shard_size: str | None,
    max_memory: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    output = recipe.output
    if dtype is not None:
        output = replace(output, dtype=parse_dtype(dtype, "--dtype"))
    if shard_size is not None:
        output = replace(output, shard_size=parse_size(shard_size, "--shard-size"))
    budget = parse_size(max_memory, "--max-memory") if max_memory else DEFAULT_MAX_MEMORY
    plan = build_plan(replace(recipe, output=output))
    result = run_merge(plan, out, max_memory=budget, overwrite=overwrite, progress=not quiet)
    if not quiet:
        click.echo(summary(plan, result))


INTERRUPTED = "lazymerge: interrupted; the output is incomplete (.partial shards, no index)"


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure is one line on stderr and a non-zero exit."""
    debug = bool(os.environ.get("LAZYMERGE_DEBUG"))
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


if __name__ == "__main__":
    sys.exit(main())
