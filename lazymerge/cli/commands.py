"""The commands: each parses its flags, calls one library function, prints the result."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import click

from lazymerge import __version__
from lazymerge.cli.flags import (
    BatchFlags,
    OutputFlags,
    WriteFlags,
    batch_options,
    flag_plan_options,
    floats,
    plan_from,
    plan_options,
    warn_limits,
    write_options,
)
from lazymerge.errors import RecipeError
from lazymerge.recipe.parse import load_recipe, parse_recipe
from lazymerge.recipe.spec import Recipe


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was, to stop as cleanly as Ctrl-C does."""


def interrupt_status(e: BaseException) -> int:
    """The exit status of an interrupted command: 128 + the signal (SIGINT 2, SIGTERM 15)."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lazymerge")
def cli() -> None:
    """Merge LLM checkpoints in one streaming pass: LoRAs on the fly, layer gradients,
    memory bounded by a few tensors."""


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@plan_options
@write_options
def merge(recipe: Path, **opts: Any) -> None:
    """Run the merge a RECIPE (YAML) describes: a lazymerge recipe (two models and a
    gradient, or `models:` and a method) or a mergekit config as it is (`merge_method:`).

    Example: lazymerge merge examples/airolima-chronos.yaml -o ./airolima-chronos
    """
    _run(load_recipe(recipe), recipe.stem, **opts)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--weight", type=float, default=1.0, show_default=True, help="Multiplier of the LoRA delta."
)
@flag_plan_options
@write_options
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
@flag_plan_options
@write_options
def gradient(  # click passes each argument and flag as a parameter
    base: Path, other: Path, values: str, layers: str | None, rest: str, **opts: Any
) -> None:
    """Blend OTHER into BASE with a layer gradient (BlockMerge_Gradient's flags).

    Example: lazymerge gradient ./chronos-13b ./airolima -o ./out --values 0.9,0 --layers 0:25
    """
    rule: dict[str, Any] = {
        "values": floats(values, "--values"),
        "rest": floats(rest, "--rest")[0],
    }
    if layers is not None:
        rule["layers"] = layers
    data = {"base": str(base), "other": str(other), "gradient": rule}
    _run(parse_recipe(data, Path.cwd(), "gradient"), Path(opts["out"]).name, **opts)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@plan_options
@click.option(
    "--json", "as_json", is_flag=True, help="The whole plan as JSON, every tensor included."
)
def plan(  # click passes each flag as a parameter
    recipe: Path,
    dtype: str | None,
    shard_size: str | None,
    max_memory: str | None,
    allow_noop: bool,
    format_: str | None,
    quant: str | None,
    no_tokenizer: bool,
    as_json: bool,
) -> None:
    """Show what `merge` will do, from headers alone: per-layer ratios (or, for a method
    over N models, each model's parameters and the passes per tensor), copied and
    computed tensors, LoRA terms, bytes, shards, expected peak memory.

    Example: lazymerge plan examples/airolima-chronos.yaml --max-memory 256MiB
    """
    from lazymerge.views.report import plan_json, plan_text

    output = OutputFlags(dtype, shard_size, format_, quant, no_tokenizer)
    the_plan, budget = plan_from(load_recipe(recipe), output, max_memory, allow_noop)
    warn_limits(the_plan, budget)
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

    # Drawing a blend that changes nothing harms nothing: no --allow-noop needed here.
    the_plan, _ = plan_from(load_recipe(recipe), OutputFlags(), None, allow_noop=True)
    click.echo(f"wrote {plot_blend(the_plan, out, recipe.stem)}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="List every tensor.")
def inspect(path: Path, show_all: bool) -> None:
    """Describe a checkpoint (format, shards, dtypes, parameters, layers, tensors), a
    PEFT adapter (rank, alpha, rsLoRA, targets, the base tensors it touches), or a GGUF
    file (architecture, types, tokenizer, tensors).

    Example: lazymerge inspect ./chronos-13b-v2 --all
    """
    from lazymerge.views.inspect import describe

    click.echo(describe(path, show_all))


def _run(recipe: Recipe, title: str, **opts: Any) -> None:
    """Plan, merge (drawing the card's picture meanwhile), report."""
    # Imported here: plan, inspect, verify, --help need none of them. (No torch: run_merge
    # imports it on a thread of its own while its first bytes are copied, run/load.py.)
    from lazymerge.run.merge import run_merge
    from lazymerge.run.options import MergeOptions
    from lazymerge.views.card import ModelCard, start_picture
    from lazymerge.views.report import result_json, summary

    flags = WriteFlags(**opts)
    if flags.resume and flags.overwrite:
        raise RecipeError(
            "--resume keeps an earlier attempt's shards, --overwrite discards them: choose one"
        )
    the_plan, budget = plan_from(recipe, flags.output, flags.max_memory, flags.allow_noop)
    warn_limits(the_plan, budget)
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


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@batch_options
@plan_options
def batch(recipes: tuple[Path, ...], **opts: Any) -> int:  # click passes each flag
    """Run many RECIPES, one task per output shard, on local processes or Ray; bytes are
    those of `lazymerge merge`. A failed merge does not stop the others; a re-run keeps
    complete merges and shards. Inputs and OUT_ROOT must be at the same paths on every
    worker (shared storage).

    Example: lazymerge batch sweep/*.yaml --out-root /nfs/merges --executor ray --address auto
    """
    from lazymerge.run.batch import FAILED, run_batch
    from lazymerge.views.batch import batch_json, batch_table
    from lazymerge.views.card import drawn_here

    flags = BatchFlags(**opts)
    settings, runner = flags.settings(), flags.executor_here()
    start = time.monotonic()
    try:
        merges = run_batch(recipes, flags.out_root, settings, runner, drawn_here)
    except KeyboardInterrupt as e:
        click.echo(
            "lazymerge: interrupted; unfinished merges have no index; run the same batch "
            "again to continue (completed shards are kept)",
            err=True,
        )
        return interrupt_status(e)
    seconds = time.monotonic() - start
    for m in merges:
        if m.plan is not None and m.output is not None:  # planned, and run (not skipped)
            warn_limits(m.plan, settings.max_memory, f"{m.recipe_path}: ")
    if flags.as_json:
        click.echo(json.dumps(batch_json(merges, seconds)))
    elif not flags.quiet:
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
