"""The command line's flags: the options commands share, and what they become (a budget,
MergeOptions' parts, BatchSettings, an executor)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lazymerge.errors import RecipeError
from lazymerge.plan.build import build_plan
from lazymerge.plan.model import MergePlan
from lazymerge.plan.noop import refuse_noop
from lazymerge.plan.shards import largest_oversized
from lazymerge.recipe.parse import check_output, parse_dtype, parse_format, parse_size
from lazymerge.recipe.spec import GGUF_QUANTS, Recipe
from lazymerge.run.budget import (
    DEFAULT_MAX_MEMORY,
    LORA_ROWS,
    estimate_peak,
    least_effective_budget,
)

if TYPE_CHECKING:  # batch's modules are imported by `batch` alone (start-up time)
    from lazymerge.run.batch import BatchSettings
    from lazymerge.run.workers import Executor

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def apply(options: list[Decorator]) -> Decorator:
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


RECIPE_DTYPE = (
    "Output dtype: float16, bfloat16 or float32 (default: the recipe's, else the base's)."
)
BASE_DTYPE = "Output dtype: float16, bfloat16 or float32 (default: the base's)."
ALLOW_NOOP = (
    "Merge even when the recipe changes nothing (an untrained LoRA, a rule no tensor "
    "matches, all ratios 0)."
)


def _plan_options(dtype_help: str) -> Decorator:
    return apply([
        click.option("--dtype", help=dtype_help),
        click.option("--shard-size",
                     help="Largest output shard, e.g. 2GB, 500MiB (default 2GB); a GGUF is one file "
                     "unless given, then split files named as llama.cpp's gguf-split names them."),
        click.option("--max-memory", default=None,
                     help=f"Working-buffer budget, e.g. 512MiB (default {DEFAULT_MAX_MEMORY // 2**20}MiB); "
                     "larger tensors are processed in row blocks (of at least 64 rows)."),
        click.option("--allow-noop", is_flag=True, help=ALLOW_NOOP),
        click.option("--format", "format_", type=click.Choice(["safetensors", "gguf"]),
                     help="Output format: safetensors (default, unless a recipe says) or gguf, one llama.cpp file (needs --quant)."),
        click.option("--quant", help=f"GGUF encoding: {', '.join(GGUF_QUANTS)}."),
        click.option("--no-tokenizer", is_flag=True,
                     help="GGUF without tokenizer keys (llama.cpp refuses such a file; transformers can use one)."),
    ])  # fmt: skip


# What shapes the plan: every command that plans takes these (`lora` and `gradient`,
# which take no recipe, with their own --dtype help).
plan_options = _plan_options(RECIPE_DTYPE)
flag_plan_options = _plan_options(BASE_DTYPE)
# What writing a model needs besides.
write_options = apply([
    click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
                 help="Output model directory (created if missing)."),
    click.option("--overwrite", is_flag=True, help="Replace the merge files of a non-empty output directory."),
    click.option("--resume", is_flag=True,
                 help="Continue an interrupted merge: keep the shards whose sha256 matches lazymerge.json, redo the rest "
                 "(a complete merge of the same recipe and inputs is left as it is)."),
    click.option("--allow-nonfinite", is_flag=True, help="Write merged tensors even if they hold NaN/Inf (default: stop, naming the tensor)."),
    click.option("--device", default="cpu", show_default=True,
                 help="Where the arithmetic runs: cpu, cuda, cuda:N, or auto (a GPU if there is one). "
                 "GPU output equals CPU output except LoRA and DoRA tensors, within 1 ulp there."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON summary on stdout (time, peak RSS, bytes, shards, sha256s)."),
])  # fmt: skip


batch_options = apply([
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


def floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise RecipeError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


@dataclass(frozen=True)
class OutputFlags:
    """The command line's output settings, each None (or False) where not given."""

    dtype: str | None = None
    shard_size: str | None = None
    format: str | None = None
    quant: str | None = None
    no_tokenizer: bool = False

    def apply(self, recipe: Recipe) -> Recipe:
        """`recipe` with these over its own output settings, checked as a whole."""
        out = recipe.with_output(
            dtype=parse_dtype(self.dtype, "--dtype") if self.dtype is not None else None,
            shard_size=parse_size(self.shard_size, "--shard-size") if self.shard_size else None,
            format=parse_format(self.format, "--format") if self.format is not None else None,
            quant=self.quant,
            tokenizer=False if self.no_tokenizer else None,
        )
        return replace(out, output=check_output(out.output, "output (--format, --quant)"))


def plan_from(
    recipe: Recipe, output: OutputFlags, max_memory: str | None, allow_noop: bool = False
) -> tuple[MergePlan, int]:
    """The plan and the working budget the flags ask for; a plan that would change nothing
    is refused (NoopError) unless `allow_noop`."""
    budget = parse_size(max_memory, "--max-memory") if max_memory else DEFAULT_MAX_MEMORY
    plan = build_plan(output.apply(recipe))
    if not allow_noop:
        refuse_noop(plan)
    return plan, budget


def limit_warnings(plan: MergePlan, budget: int) -> list[str]:
    """What the shard size and the memory budget cannot do for this plan, and what is used
    instead: one line each, for stderr."""
    from lazymerge.views.report import human_bytes

    lines = []
    shard_size = plan.recipe.output.shard_limit
    largest = largest_oversized([t.nbytes for t in plan.tensors], shard_size)
    if largest is not None:
        lines.append(
            f"shard size {human_bytes(shard_size)} is below the largest tensor "
            f"({human_bytes(largest)}): tensors larger than a shard get a shard of their "
            f"own ({len(plan.shards)} shards)"
        )
    least = least_effective_budget(plan)
    if budget < least:
        lines.append(
            f"--max-memory {human_bytes(budget)} is below one {LORA_ROWS}-row block of the "
            f"widest tensor ({human_bytes(least)}): blocks of {LORA_ROWS} rows are used, "
            f"about {human_bytes(estimate_peak(plan, budget))} peak"
        )
    return lines


def warn_limits(plan: MergePlan, budget: int, prefix: str = "") -> None:
    for line in limit_warnings(plan, budget):
        click.echo(f"lazymerge: warning: {prefix}{line}", err=True)


@dataclass(frozen=True)
class WriteFlags:
    """The flags of a command that writes a model (plan_options and write_options):
    click hands each over as a keyword argument, and they travel on together."""

    out: Path
    dtype: str | None
    shard_size: str | None
    max_memory: str | None
    allow_noop: bool
    format_: str | None
    quant: str | None
    no_tokenizer: bool
    overwrite: bool
    resume: bool
    allow_nonfinite: bool
    device: str
    quiet: bool
    as_json: bool

    @property
    def output(self) -> OutputFlags:
        return OutputFlags(self.dtype, self.shard_size, self.format_, self.quant, self.no_tokenizer)


@dataclass(frozen=True)
class BatchFlags:
    """`batch`'s flags (batch_options and plan_options), as click hands them over."""

    out_root: Path
    executor: str
    jobs: int
    address: str | None
    retries: int
    dtype: str | None
    shard_size: str | None
    max_memory: str | None
    allow_noop: bool
    format_: str | None
    quant: str | None
    no_tokenizer: bool
    overwrite: bool
    allow_nonfinite: bool
    device: str
    quiet: bool
    as_json: bool

    def __post_init__(self) -> None:
        if self.address is not None and self.executor != "ray":
            raise RecipeError("--address is for --executor ray")
        if self.format_ == "gguf" or self.quant is not None or self.no_tokenizer:
            raise RecipeError(
                "batch writes safetensors shards; GGUF output (one file) is for merge: "
                "run lazymerge merge --format gguf per recipe"
            )

    def settings(self) -> BatchSettings:
        from lazymerge.run.batch import BatchSettings

        return BatchSettings(
            dtype=parse_dtype(self.dtype, "--dtype") if self.dtype else None,
            shard_size=parse_size(self.shard_size, "--shard-size") if self.shard_size else None,
            max_memory=parse_size(self.max_memory, "--max-memory")
            if self.max_memory
            else DEFAULT_MAX_MEMORY,
            overwrite=self.overwrite,
            allow_nonfinite=self.allow_nonfinite,
            allow_noop=self.allow_noop,
            progress=not self.quiet,
            device=self.device,
        )

    def executor_here(self) -> Executor:
        """The executor the flags ask for, its device checked as far as this machine can."""
        # Local workers have this machine's GPUs; Ray's may have others: the name only.
        from lazymerge.run.device import parse_device, resolve_device
        from lazymerge.run.workers import LocalExecutor, RayExecutor

        (resolve_device if self.executor == "local" else parse_device)(self.device)
        if self.executor == "ray":
            return RayExecutor(self.address, self.jobs, self.retries)
        return LocalExecutor(self.jobs, self.retries)
