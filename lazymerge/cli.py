"""Thin click shell: parse, build a Recipe, plan, run, map errors to one line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from lazymerge import __version__
from lazymerge.errors import LazyMergeError, RecipeError
from lazymerge.plan.build import build_plan
from lazymerge.plan.model import MergePlan
from lazymerge.recipe.parse import load_recipe, parse_dtype, parse_recipe, parse_size
from lazymerge.recipe.spec import Recipe
from lazymerge.run.budget import DEFAULT_MAX_MEMORY
from lazymerge.run.device import parse_device, resolve_device
from lazymerge.run.merge import run_merge
from lazymerge.run.options import MergeOptions

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _apply(options: list[Decorator]) -> Decorator:
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


# What shapes the plan: every command that plans takes these.
_plan_options = _apply([
    click.option("--dtype", help="Output dtype: float16, bfloat16 or float32 (default: the recipe's, else the base's)."),
    click.option("--shard-size", help="Largest output shard, e.g. 2GB, 500MiB (default 2GB)."),
    click.option("--max-memory", default=None,
                 help=f"Working-buffer budget, e.g. 512MiB (default {DEFAULT_MAX_MEMORY // 2**20}MiB); "
                 "larger tensors are processed in row blocks (of at least 64 rows)."),
])  # fmt: skip
# What writing a model needs besides.
_write_options = _apply([
    click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
                 help="Output model directory (created if missing)."),
    click.option("--overwrite", is_flag=True, help="Replace the merge files of a non-empty output directory."),
    click.option("--resume", is_flag=True,
                 help="Continue an interrupted merge: keep the shards whose sha256 matches lazymerge.json, redo the rest."),
    click.option("--allow-nonfinite", is_flag=True, help="Write merged tensors even if they hold NaN/Inf (default: stop, naming the tensor)."),
    click.option("--device", default="cpu", show_default=True,
                 help="Where the arithmetic runs: cpu, cuda, cuda:N, or auto (a GPU if there is one). "
                 "GPU output equals CPU output except LoRA and DoRA tensors, within 1 ulp there."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON summary on stdout (time, peak RSS, bytes, shards, sha256s)."),
])  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lazymerge")
def cli() -> None:
    """Merge LLM checkpoints in one streaming pass: LoRAs on the fly, layer gradients,
    memory bounded by a few tensors."""


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_plan_options
@_write_options
def merge(recipe: Path, **opts: Any) -> None:
    """Run the merge a RECIPE (YAML) describes.

    Example: lazymerge merge examples/airolima-chronos.yaml -o ./airolima-chronos
    """
    _run(load_recipe(recipe), recipe.stem, **opts)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--weight", type=float, default=1.0, show_default=True, help="Multiplier of the LoRA delta."
)
@_plan_options
@_write_options
def lora(base: Path, adapter: Path, weight: float, **opts: Any) -> None:
    """Merge one PEFT LoRA ADAPTER into BASE at --weight.

    Example: lazymerge lora ./airoboros-13b ./limarp-lora -o ./airolima --weight 0.25
    """
    data = {"base": {"model": str(base), "loras": [{"path": str(adapter), "weight": weight}]}}
    _run(parse_recipe(data, Path.cwd(), "lora"), Path(opts["out"]).name, **opts)


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
@_plan_options
@_write_options
def gradient(  # click passes each argument and flag as a parameter
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
    _run(parse_recipe(data, Path.cwd(), "gradient"), Path(opts["out"]).name, **opts)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_plan_options
@click.option(
    "--json", "as_json", is_flag=True, help="The whole plan as JSON, every tensor included."
)
def plan(
    recipe: Path, dtype: str | None, shard_size: str | None, max_memory: str | None, as_json: bool
) -> None:
    """Show what `merge` will do, from headers alone: per-layer ratios, copied and
    computed tensors, LoRA terms, bytes, shards, expected peak memory.

    Example: lazymerge plan examples/airolima-chronos.yaml --max-memory 256MiB
    """
    from lazymerge.views.report import plan_json, plan_text

    the_plan, budget = _plan(load_recipe(recipe), dtype, shard_size, max_memory)
    click.echo(
        json.dumps(plan_json(the_plan, budget), indent=2)
        if as_json
        else plan_text(the_plan, budget)
    )


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Picture file: .png, .svg or .pdf.",
)
def plot(recipe: Path, out: Path) -> None:
    """Draw the blend: per layer, the share of base and other and the LoRA's
    effective weight (needs matplotlib: pip install 'lazymerge[plot]').

    Example: lazymerge plot examples/airolima-chronos.yaml -o blend.png
    """
    from lazymerge.views.plot import plot_blend

    the_plan, _ = _plan(load_recipe(recipe), None, None, None)
    click.echo(f"wrote {plot_blend(the_plan, out, recipe.stem)}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="List every tensor.")
def inspect(path: Path, show_all: bool) -> None:
    """Describe a checkpoint (format, shards, dtypes, parameters, layers, tensors) or a
    PEFT adapter (rank, alpha, rsLoRA, targets, the base tensors it touches).

    Example: lazymerge inspect ./chronos-13b-v2 --all
    """
    from lazymerge.views.inspect import describe

    click.echo(describe(path, show_all))


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise RecipeError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def _plan(
    recipe: Recipe, dtype: str | None, shard_size: str | None, max_memory: str | None
) -> tuple[MergePlan, int]:
    recipe = recipe.with_output(
        parse_dtype(dtype, "--dtype") if dtype is not None else None,
        parse_size(shard_size, "--shard-size") if shard_size is not None else None,
    )
    budget = parse_size(max_memory, "--max-memory") if max_memory else DEFAULT_MAX_MEMORY
    return build_plan(recipe), budget


@dataclass(frozen=True)
class _WriteFlags:
    """The flags of a command that writes a model (_plan_options and _write_options):
    click hands each over as a keyword argument, and they travel on together."""

    out: Path
    dtype: str | None
    shard_size: str | None
    max_memory: str | None
    overwrite: bool
    resume: bool
    allow_nonfinite: bool
    device: str
    quiet: bool
    as_json: bool


def _run(recipe: Recipe, title: str, **opts: Any) -> None:
    """Plan, merge (drawing the card's picture meanwhile), report."""
    from lazymerge.views.card import ModelCard, start_picture
    from lazymerge.views.report import result_json, summary

    flags = _WriteFlags(**opts)
    if flags.resume and flags.overwrite:
        raise RecipeError(
            "--resume keeps an earlier attempt's shards, --overwrite discards them: choose one"
        )
    the_plan, budget = _plan(recipe, flags.dtype, flags.shard_size, flags.max_memory)
    picture = start_picture(the_plan, title)
    options = MergeOptions(
        max_memory=budget, overwrite=flags.overwrite, resume=flags.resume,
        progress=not flags.quiet, allow_nonfinite=flags.allow_nonfinite, device=flags.device,
        card=ModelCard(the_plan, title, picture),
    )  # fmt: skip
    try:
        result = run_merge(the_plan, flags.out, options)
    finally:
        if picture is not None:
            picture.discard()
    if flags.as_json:
        click.echo(json.dumps(result_json(result)))
    elif not flags.quiet:
        click.echo(summary(the_plan, result))
    for name in result.nonfinite:
        click.echo(f"lazymerge: warning: {name} holds NaN/Inf values (--allow-nonfinite)", err=True)


_batch_options = _apply([
    click.option("--out-root", required=True, type=click.Path(path_type=Path),
                 help="Each merge goes to OUT_ROOT/<recipe file name without extension>/."),
    click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="local: worker processes here; ray: tasks on a Ray cluster (pip install 'lazymerge[ray]')."),
    click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Shards written at once (local), or CPUs of the Ray instance started here."),
    click.option("--address", help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start one here)."),
    click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
                 help="Times a shard is redone after its worker dies."),
    click.option("--overwrite", is_flag=True, help="Redo every merge, even complete ones (default: keep complete merges and shards)."),
    click.option("--allow-nonfinite", is_flag=True, help="Write merged tensors even if they hold NaN/Inf."),
    click.option("--device", default="cpu", show_default=True,
                 help="Where each task's arithmetic runs: cpu, cuda, cuda:N or auto (on Ray, cuda asks one GPU per task)."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
])  # fmt: skip


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@_batch_options
@_plan_options
def batch(
    recipes: tuple[Path, ...],
    out_root: Path,
    executor: str,
    jobs: int,
    address: str | None,
    retries: int,
    dtype: str | None,
    shard_size: str | None,
    max_memory: str | None,
    overwrite: bool,
    allow_nonfinite: bool,
    device: str,
    quiet: bool,
    as_json: bool,
) -> int:
    """Run many RECIPES, one task per output shard, on local processes or Ray; bytes are
    those of `lazymerge merge`. A failed merge does not stop the others; a re-run keeps
    complete merges and shards. Inputs and OUT_ROOT must be at the same paths on every
    worker (shared storage).

    Example: lazymerge batch sweep/*.yaml --out-root /nfs/merges --executor ray --address auto
    """
    from lazymerge.run.batch import FAILED, BatchSettings, batch_json, batch_table, run_batch
    from lazymerge.run.workers import Executor, LocalExecutor, RayExecutor

    if address is not None and executor != "ray":
        raise RecipeError("--address is for --executor ray")
    settings = BatchSettings(
        dtype=parse_dtype(dtype, "--dtype") if dtype else None,
        shard_size=parse_size(shard_size, "--shard-size") if shard_size else None,
        max_memory=parse_size(max_memory, "--max-memory") if max_memory else DEFAULT_MAX_MEMORY,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
        device=device,
    )
    # Local workers have this machine's GPUs; Ray's may have others: the name only.
    (resolve_device if executor == "local" else parse_device)(device)
    runner: Executor = (
        RayExecutor(address, jobs, retries) if executor == "ray" else LocalExecutor(jobs, retries)
    )
    start = time.monotonic()
    try:
        merges = run_batch(recipes, out_root, settings, runner)
    except KeyboardInterrupt:
        click.echo(
            "lazymerge: interrupted; unfinished merges have no index; run the same batch "
            "again to continue (completed shards are kept)",
            err=True,
        )
        return 130
    seconds = time.monotonic() - start
    if as_json:
        click.echo(json.dumps(batch_json(merges, seconds)))
    elif not quiet:
        click.echo(batch_table(merges, seconds))
    failed = [m for m in merges if m.status == FAILED]
    for m in failed:
        click.echo(f"lazymerge: error: {m.recipe_path}: {m.error}", err=True)
    return 1 if failed else 0


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--deep", is_flag=True, help="Also read every tensor and check for NaN/Inf.")
def verify(out: Path, deep: bool) -> None:
    """Check a merged model against its lazymerge.json: every shard's sha256 and size,
    well-formed headers, an index that matches the shards.

    Example: lazymerge verify ./airolima-chronos-grad-l2-13B --deep
    """
    from lazymerge.views.verify import verify_output

    click.echo(verify_output(out, deep))


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


if __name__ == "__main__":
    sys.exit(main())
