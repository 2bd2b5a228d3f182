"""`lazymerge batch`: many recipes, one task per output shard, on local processes or Ray.

A plan fixes every output shard's tensors, offsets and header from the input headers
alone, so any worker that sees the same files (shared storage) can write any shard, in
any order, and the bytes are those of a serial `lazymerge merge`. Workers write shards
only; the driver alone writes each merge's manifest and, once all of its shards are in
and checked, its card and index. A worker that dies leaves a `.partial` file, which the
retried task overwrites; a re-run keeps what the `--resume` rules keep.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lazymerge.errors import LazyMergeError, OutputError, RecipeError
from lazymerge.plan.build import build_plan
from lazymerge.plan.model import MergePlan
from lazymerge.plan.noop import refuse_noop
from lazymerge.read.checkpoint import SAFETENSORS_INDEX
from lazymerge.recipe.parse import load_recipe
from lazymerge.run.budget import DEFAULT_MAX_MEMORY
from lazymerge.run.workers import Executor, ShardDone, ShardTask, failure_text
from lazymerge.write.manifest import Record, file_sha256, is_complete
from lazymerge.write.output import Card, Output, output_errors, prepare_dir
from lazymerge.write.safetensors import ShardResult, build_header


class Status(StrEnum):
    """Where a merge of the batch stands."""

    PENDING = "pending"
    RUNNING = "running"
    MERGED = "merged"
    SKIPPED = "skipped"  # complete from an earlier run
    FAILED = "failed"


PENDING, RUNNING, MERGED, SKIPPED, FAILED = Status
# The model card of a merge's output: (plan, title) -> Card.
CardFor = Callable[[MergePlan, str], Card]


@dataclass(frozen=True)
class BatchSettings:
    dtype: str | None = None
    shard_size: int | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    overwrite: bool = False
    allow_nonfinite: bool = False
    allow_noop: bool = False  # merge even a recipe that would change nothing
    progress: bool = True
    device: str = "cpu"


@dataclass
class Merge:
    """One recipe's merge in a batch, as the driver follows it."""

    recipe_path: Path
    out: Path
    status: Status = PENDING
    error: str = ""
    plan: MergePlan | None = None
    output: Output | None = None  # once its directory is prepared
    shards: dict[str, ShardResult] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)
    kept: int = 0  # shards an earlier run completed
    written: int = 0  # bytes of the shards this run wrote
    redone: int = 0  # shards whose worker died and were written again
    seconds: float = 0.0  # worker time spent on its shards
    peak_rss: int = 0  # the largest worker's
    index_sha256: str = ""

    @property
    def name(self) -> str:
        return self.recipe_path.stem

    @property
    def bytes_written(self) -> int:
        """Bytes of the shards this run wrote (kept ones not counted)."""
        return self.written

    def fail(self, why: str) -> None:
        if self.status != FAILED:  # the first reason is the one to fix
            self.status, self.error = FAILED, why


def run_batch(
    recipes: Sequence[Path],
    out_root: Path,
    settings: BatchSettings,
    executor: Executor,
    card: CardFor,
) -> list[Merge]:
    """Run every recipe's merge into out_root/<recipe stem>/; one failing does not stop
    the others. `card(plan, title)` is each output's model card (the command line's:
    lazymerge.views.card.drawn_here)."""
    _refuse_same_names(recipes)
    out_root = out_root.expanduser().resolve()
    merges = [Merge(Path(r), out_root / Path(r).stem) for r in recipes]
    tasks: list[ShardTask] = []
    for i, m in enumerate(merges):
        try:
            tasks += _open(i, m, settings)
        except (LazyMergeError, OSError) as e:
            m.fail(failure_text(e))
    waiting = collections.Counter(t.merge for t in tasks)
    for i, m in enumerate(merges):
        if m.status == RUNNING and not waiting[i]:  # every shard kept; the index was missing
            _settle(m, card)
    with tqdm(
        total=sum(t.nbytes for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
        desc="batch", disable=not settings.progress, file=sys.stderr,
    ) as bar:  # fmt: skip
        for task, outcome in executor.run(tasks):
            m = merges[task.merge]
            bar.update(task.nbytes)
            waiting[task.merge] -= 1
            if isinstance(outcome, str):
                m.fail(f"{task.name}: {outcome}")
            else:
                _take(m, outcome)
            if not waiting[task.merge]:
                _settle(m, card)
    return merges


def _settle(m: Merge, card: CardFor) -> None:
    """All of a merge's tasks have ended: finish it, unless one of them failed."""
    if m.status == FAILED:
        return
    try:
        _finish(m, card)
    except (LazyMergeError, OSError) as e:
        m.fail(failure_text(e))


def _refuse_same_names(recipes: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for r in map(Path, recipes):
        if r.stem in seen:
            raise RecipeError(
                f"{seen[r.stem]} and {r} would both write to <out-root>/{r.stem}; rename one"
            )
        seen[r.stem] = r


def _open(i: int, m: Merge, settings: BatchSettings) -> list[ShardTask]:
    """Plan one merge and prepare its output; the tasks of the shards it still needs."""
    recipe = load_recipe(m.recipe_path).with_output(
        dtype=settings.dtype, shard_size=settings.shard_size
    )
    if recipe.output.format == "gguf":
        raise RecipeError(
            f"{m.recipe_path}: output format gguf is one file, written by lazymerge merge; "
            "batch writes safetensors shards: merge this recipe on its own"
        )
    m.plan = plan = build_plan(recipe)
    if not settings.allow_noop:
        refuse_noop(plan)
    record = Record(plan)
    if not settings.overwrite and is_complete(m.out, plan, record):
        m.status, m.index_sha256 = SKIPPED, file_sha256(m.out / SAFETENSORS_INDEX)
        return []
    m.out = prepare_dir(m.out, recipe.inputs(), settings.overwrite, resume=not settings.overwrite)
    m.output = Output(m.out, plan, record)
    with output_errors(m.out, "re-run the batch"):
        kept = m.output.start(resume=not settings.overwrite)
    m.shards, m.kept, m.status = dict(kept), len(kept), RUNNING
    expect = _expect(record)
    return [
        ShardTask(
            i,
            n,
            s.name,
            recipe,
            m.out,
            expect,
            settings.max_memory,
            settings.allow_nonfinite,
            s.data_size,
            settings.device,
        )
        for n, s in enumerate(plan.shards)
        if s.name not in kept
    ]


def _expect(record: Record) -> dict[str, Any]:
    return {k: record.fixed[k] for k in ("lazymerge_version", "recipe_sha256", "inputs")}


def _take(m: Merge, done: ShardDone) -> None:
    assert m.output is not None
    m.shards[done.result.name] = done.result
    m.written += done.result.size
    m.nonfinite += done.nonfinite
    m.redone += done.redone
    m.seconds += done.seconds
    m.peak_rss = max(m.peak_rss, done.peak_rss)
    if m.status != FAILED:
        m.output.progress(_in_order(m))


def _in_order(m: Merge) -> list[ShardResult]:
    assert m.plan is not None
    return [m.shards[s.name] for s in m.plan.shards if s.name in m.shards]


def _finish(m: Merge, card: CardFor) -> None:
    """Check every shard the workers wrote, then write the card, manifest and index."""
    plan = m.plan
    assert plan is not None and m.output is not None
    for s in plan.shards:
        path = m.out / s.name
        result = m.shards.get(s.name)
        header = build_header(s.tensors)
        if result is None or not path.is_file() or path.stat().st_size != result.size:
            raise OutputError(f"{path}: missing or not the size its worker reported")
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                raise OutputError(f"{path}: its header is not the plan's")
    with output_errors(m.out, "re-run the batch"):
        m.output.finish(_in_order(m), card(plan, m.name), m.nonfinite)
    m.status, m.index_sha256 = MERGED, file_sha256(m.out / SAFETENSORS_INDEX)
