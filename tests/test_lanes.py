"""Compute lanes (run/device.py `Lanes`): a block's chunks blended by several threads at
once give the bytes one lane gives, byte for byte, for every kind of merge, statistics
passes shared among the lanes too; a method that carries state from block to block stays
on one lane; a failure in a lane stops the merge, even while other lanes wait on it.

Chunks are cut small here (`small_chunks`: LORA_ROWS rows where adapters apply, else 40,
no multiple of 64) so that the small test tensors have several per block, as a 13B
layer's have hundreds.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lazymerge.plan import build_plan
from lazymerge.plan.model import PlannedTensor
from lazymerge.recipe import load_recipe
from lazymerge.run import budget, tensor
from lazymerge.run.device import Lanes
from lazymerge.run.merge import run_merge
from lazymerge.run.options import MergeOptions
from lazymerge.testing import LlamaShape, write_llama

from conftest import run_cli, synthetic_job

SHAPE = LlamaShape(layers=3, hidden=128, intermediate=320, heads=4, kv_heads=4, vocab=640)
BLOCKS = 256 * 2**10  # --max-memory: blocks of 192 rows here, three chunks each
NMODEL_BLOCKS = 2**20  # the same for three models (more fp32 rows each)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base, other and a LoRA on the other (the founding recipe's), and a third model."""
    root = tmp_path_factory.mktemp("lanes")
    recipe = synthetic_job(
        root, SHAPE, {"values": [0.9, 0.0], "layers": [0, 2]}, r=8, output={"dtype": "float16"}
    )
    write_llama(root / "third", SHAPE, seed=4)
    return recipe


def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks as budget.chunk_rows cuts them with a cache a few rows wide: LORA_ROWS rows
    where adapters apply, else SMALL_CHUNK (its 1-row chunks would only make the tests slow)."""

    def rows(t: PlannedTensor, block: int, threads: int) -> int:
        return min(block, budget.LORA_ROWS if any(i.terms for i in t.inputs) else SMALL_CHUNK)

    monkeypatch.setattr(budget, "chunk_rows", rows)


SMALL_CHUNK = 40


@pytest.fixture
def lane_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Small chunks; the names of the threads that computed them."""
    small_chunks(monkeypatch)
    names: set[str] = set()
    fill = tensor._Fill.__call__

    def spy(self: tensor._Fill, source: Any, span: tuple[int, int]) -> None:
        names.add(threading.current_thread().name)
        fill(self, source, span)

    monkeypatch.setattr(tensor._Fill, "__call__", spy)
    yield names


def digests(out: Path) -> dict[str, str]:
    """sha256 of every weights file of a merged model."""
    files = sorted([*out.glob("*.safetensors"), *out.glob("*.gguf")])
    assert files, f"{out}: nothing written"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def merged(recipe: Path, out: Path, lanes: int, max_memory: int) -> dict[str, str]:
    plan = build_plan(load_recipe(recipe))
    run_merge(plan, out, MergeOptions(max_memory=max_memory, progress=False, lanes=lanes))
    return digests(out)


def write(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("max_memory", [budget.DEFAULT_MAX_MEMORY, BLOCKS])
def test_founding_recipe_bytes_do_not_depend_on_lanes(
    job: Path, tmp_path: Path, lane_threads: set[str], max_memory: int
) -> None:
    """LoRA products (fixed LORA_ROWS chunks) and the gradient blend, in one block or
    several: 1, 2 and 3 lanes write the same shards, and the lanes did the work."""
    one = merged(job, tmp_path / "one", 1, max_memory)
    assert lane_threads == {"MainThread"}
    lane_threads.clear()
    assert merged(job, tmp_path / "two", 2, max_memory) == one
    assert lane_threads == {"lane 0", "lane 1"} | ({"MainThread"} & lane_threads)
    assert merged(job, tmp_path / "three", 3, max_memory) == one
    assert {"lane 0", "lane 1", "lane 2"} <= lane_threads


def nmodel(
    job: Path, method: str, shared: dict[str, Any], keys: tuple[str, ...] = ("weight", "density")
) -> dict[str, Any]:
    """A native recipe of the base and two models, each with the parameters `keys` names."""
    root = job.parent
    models = []
    for name, weight in (("other", 0.6), ("third", 0.4)):
        parameters = {"weight": weight, "density": 0.5}
        models.append({"model": str(root / name), "parameters": {k: parameters[k] for k in keys}})
    return {
        "method": method,
        "base": str(root / "base"),
        "models": models,
        "parameters": shared,
        "seed": 7,
    }


@pytest.mark.parametrize("shared", [{"rescale": False}, {}], ids=["dare_ties", "dare_ties-rescale"])
def test_dare_bytes_do_not_depend_on_lanes(
    job: Path, tmp_path: Path, lane_threads: set[str], shared: dict[str, Any]
) -> None:
    """DARE's random masks are keyed by element, not by who draws them: lanes share its
    chunks, with or without the rescale's statistics pass."""
    recipe = write(tmp_path / "recipe.yaml", nmodel(job, "dare_ties", shared))
    one = merged(recipe, tmp_path / "one", 1, NMODEL_BLOCKS)
    lane_threads.clear()
    assert merged(recipe, tmp_path / "two", 2, NMODEL_BLOCKS) == one
    assert "lane 1" in lane_threads, lane_threads


def mergekit_pair(job: Path, method: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """A mergekit config of the base and the other model, in float16."""
    root = job.parent
    weights = {"weight": 0.5} if method == "nuslerp" else {}
    sources = [
        {"model": str(root / m), "layer_range": [0, SHAPE.layers], "parameters": weights}
        for m in ("base", "other")
    ]
    config = {
        "merge_method": method,
        "base_model": str(root / "base"),
        "dtype": "float16",
        "parameters": parameters,
        "slices": [{"sources": sources}],
    }
    if method == "nuslerp":
        del config["base_model"]
    return config


def test_nuslerp_row_wise_bytes_do_not_depend_on_lanes(
    job: Path, tmp_path: Path, lane_threads: set[str]
) -> None:
    """nuslerp row by row needs no statistics pass: lanes."""
    config = mergekit_pair(job, "nuslerp", {"nuslerp_flatten": False})
    recipe = write(tmp_path / "config.yml", config)
    one = merged(recipe, tmp_path / "one", 1, NMODEL_BLOCKS)
    lane_threads.clear()
    assert merged(recipe, tmp_path / "two", 2, NMODEL_BLOCKS) == one
    assert "lane 1" in lane_threads, lane_threads


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_drawn_masks_are_kept_for_the_writing_pass(
    job: Path, tmp_path: Path, lane_threads: set[str], monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """With the rescale, the norms pass draws each chunk's mask and the writing pass takes
    it back rather than drawing it again (blocks of several chunks, rows no multiple of
    the chunk, two lanes): the bytes of drawing twice, half the draws."""
    from lazymerge.meaning.methods import draws

    drawn: list[int] = []
    keep_mask = draws.keep_mask

    def count(*args: Any, **kwargs: Any) -> Any:
        drawn.append(1)
        return keep_mask(*args, **kwargs)

    monkeypatch.setattr(draws, "keep_mask", count)
    recipe = write(tmp_path / "recipe.yaml", nmodel(job, method, {"rescale": True}))
    kept = merged(recipe, tmp_path / "kept", 2, NMODEL_BLOCKS)
    once = len(drawn)
    drawn.clear()
    monkeypatch.setattr(budget, "kept_room", lambda _: 0)  # none fit: drawn in both passes
    assert merged(recipe, tmp_path / "twice", 2, NMODEL_BLOCKS) == kept
    assert once > 0 and len(drawn) == 2 * once, (once, len(drawn))


@pytest.mark.parametrize("cols", [48, 53])  # rows of whole bytes (one buffer), or not
def test_kept_masks_come_back_once_as_drawn(cols: int) -> None:
    """stats.Kept: chunks put by two threads at once, for two inputs, each taken back
    once, in another order, as it was put; a chunk never put is not there."""
    from concurrent.futures import ThreadPoolExecutor

    from lazymerge.meaning.methods.stats import Kept

    rows, gen, kept = 50, torch.Generator().manual_seed(3), Kept()
    masks = {i: torch.rand((rows, cols), generator=gen) < 0.5 for i in (1, 2)}
    spans = [(r, min(r + 7, rows)) for r in range(0, rows, 7)]  # the last one short
    jobs = [(i, r0, r1) for i in masks for r0, r1 in spans]

    def put(job: tuple[int, int, int]) -> None:
        i, r0, r1 = job
        kept.put(i, r0 * cols, masks[i][r0:r1].clone(), rows * cols)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(put, jobs))
    assert kept.take(1, 3 * cols, (7, cols)) is None  # no chunk starts there
    for i, r0, r1 in reversed(jobs):
        got = kept.take(i, r0 * cols, (r1 - r0, cols))
        assert got is not None and torch.equal(got, masks[i][r0:r1]), (i, r0)
        assert kept.take(i, r0 * cols, (r1 - r0, cols)) is None  # given back once


WITH_STATISTICS = {  # id: a recipe of a method with statistics passes
    "ties": lambda job: nmodel(job, "ties", {}),
    "ties-f16": lambda job: nmodel(job, "ties", {}) | {"compute": "float16"},
    "breadcrumbs_ties-rescale": lambda job: nmodel(job, "breadcrumbs_ties", {"rescale": True}),
    "della": lambda job: nmodel(job, "della", {}),
    "sce": lambda job: nmodel(job, "sce", {"select_topk": 0.5}, ()) | {"compute": "float16"},
    "karcher": lambda job: nmodel(job, "karcher", {}, ()),
    "multislerp": lambda job: nmodel(job, "multislerp", {}, ("weight",)),
    "model_stock": lambda job: nmodel(job, "model_stock", {}, ()),
    "slerp": lambda job: mergekit_pair(job, "slerp", {"t": [0.2, 0.8]}),
    "nuslerp": lambda job: mergekit_pair(job, "nuslerp", {}),
    "arcee_fusion": lambda job: mergekit_pair(job, "arcee_fusion", {}),
}


@pytest.fixture
def stat_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The names of the threads that fed a statistics pass's chunks into their parts."""
    names: set[str] = set()
    feed = tensor._Feed.__call__

    def spy(self: tensor._Feed, source: Any, span: tuple[int, int]) -> None:
        names.add(threading.current_thread().name)
        feed(self, source, span)

    monkeypatch.setattr(tensor._Feed, "__call__", spy)
    yield names


@pytest.mark.parametrize("case", WITH_STATISTICS)
def test_statistics_methods_bytes_do_not_depend_on_lanes(
    job: Path, tmp_path: Path, lane_threads: set[str], stat_threads: set[str], case: str
) -> None:
    """Statistics passes shared among lanes (each lane's histograms, counts and exact sums
    merged) and writing passes in lanes (top-k masks ordering their tie counts): 2 and 3
    lanes write one lane's bytes, and the lanes did both passes' work."""
    recipe = write(tmp_path / "recipe.yml", WITH_STATISTICS[case](job))
    plan = build_plan(load_recipe(recipe))
    assert any(t.method and t.method.stat_passes() for t in plan.tensors)
    one = merged(recipe, tmp_path / "one", 1, NMODEL_BLOCKS)
    assert lane_threads == {"MainThread"} and not stat_threads
    for lanes in (2, 3):
        lane_threads.clear()
        stat_threads.clear()
        assert merged(recipe, tmp_path / str(lanes), lanes, NMODEL_BLOCKS) == one, lanes
        assert {"lane 0", "lane 1"} <= lane_threads, lane_threads
        assert {"lane 0", "lane 1"} <= stat_threads, stat_threads


def test_top_k_masks_count_their_ties_in_lanes(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIES's masks keep the ties at a threshold by flat index: in lanes, each chunk's
    count waits for the chunk before it, and the cuts here do split a class of ties."""
    from lazymerge.meaning.methods import select

    counted: list[tuple[str, int]] = []  # (thread, ties ranked below the cut)
    count = select._AtLeast._count

    def spy(self: select._AtLeast, start: int | None, numel: int, ties: int) -> int:
        counted.append((threading.current_thread().name, self.ties_before))
        return count(self, start, numel, ties)

    monkeypatch.setattr(select._AtLeast, "_count", spy)
    small_chunks(monkeypatch)
    recipe = write(tmp_path / "recipe.yml", WITH_STATISTICS["ties-f16"](job))
    one = merged(recipe, tmp_path / "one", 1, NMODEL_BLOCKS)
    assert merged(recipe, tmp_path / "two", 2, NMODEL_BLOCKS) == one
    assert {name for name, before in counted if before > 0} >= {"lane 0", "lane 1"}


def test_gguf_bytes_do_not_depend_on_lanes(
    job: Path, tmp_path: Path, lane_threads: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF's blocks are computed in lanes, then encoded in its encoding lane, in order;
    the command line takes the lane count from LAZYMERGE_LANES."""
    flags = ["--format", "gguf", "--quant", "q8_0", "--no-tokenizer", "-q"]
    files = {}
    for lanes in ("1", "2"):
        monkeypatch.setenv("LAZYMERGE_LANES", lanes)
        out = tmp_path / lanes / "merged"  # the name is the GGUF's general.name
        assert run_cli("merge", job, "-o", out, *flags) == 0
        files[lanes] = digests(out)
    assert files["1"] == files["2"]
    assert "lane 1" in lane_threads


def test_a_failure_in_a_lane_stops_the_merge(
    job: Path, tmp_path: Path, lane_threads: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first failure comes back to the merge's thread; the lanes stop with the shard."""
    from lazymerge.meaning.methods.base import Block
    from lazymerge.meaning.methods.linear import Linear

    def broken(self: Linear, block: Block, stats: object = None) -> torch.Tensor:
        if threading.current_thread().name == "lane 1":
            raise ValueError("lane 1 failed")
        return block.rows(0)

    monkeypatch.setattr(Linear, "combine", broken)
    before = threading.active_count()
    with pytest.raises(ValueError, match="lane 1 failed"):
        merged(job, tmp_path / "out", 2, BLOCKS)
    assert threading.active_count() == before
    assert list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize("lanes", [1, 2])
def test_nonfinite_rows_found_by_a_lane_stop_the_merge(
    job: Path, tmp_path: Path, lane_threads: set[str], monkeypatch: pytest.MonkeyPatch, lanes: int
) -> None:
    """An Inf in one chunk of a block (checked where the chunk is cast) names the tensor
    and the block's rows; allow_nonfinite writes it and lists the tensor."""
    from lazymerge.errors import NumericsError
    from lazymerge.meaning.methods.base import Block
    from lazymerge.meaning.methods.linear import Linear

    bad, row = "model.layers.0.mlp.down_proj.weight", 100  # its second 64-row chunk
    combine = Linear.combine

    def overflowing(self: Linear, block: Block, stats: object = None) -> torch.Tensor:
        acc = combine(self, block, stats)
        if block.t.name == bad and block.start <= row < block.stop:  # type: ignore[attr-defined]
            acc[row - block.start, 3] = float("inf")
        return acc

    monkeypatch.setattr(Linear, "combine", overflowing)
    with pytest.raises(NumericsError, match=rf"{bad}: 1 NaN/Inf values in rows \d+-\d+ "):
        merged(job, tmp_path / "out", lanes, BLOCKS)
    plan = build_plan(load_recipe(job))
    options = MergeOptions(max_memory=BLOCKS, progress=False, lanes=lanes, allow_nonfinite=True)
    assert run_merge(plan, tmp_path / "allowed", options).nonfinite == (bad,)


def test_a_failure_lets_the_lanes_waiting_on_it_go(
    job: Path, tmp_path: Path, lane_threads: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A top-k mask's chunk waits for the tie counts of the chunk before it: when that
    chunk fails in its lane, the lanes waiting on it are let go (Method.abandon) and the
    merge stops with the failure, rather than waiting for ever."""
    from lazymerge.meaning.methods import select
    from lazymerge.meaning.methods.base import Block
    from lazymerge.meaning.methods.task import TaskMerge

    combine, abandon = TaskMerge.combine, select.RankMask.abandon
    abandoned: list[str] = []

    def broken(self: TaskMerge, block: Block, stats: object = None) -> torch.Tensor:
        if threading.current_thread().name == "lane 1":
            raise ValueError("lane 1 failed")
        return combine(self, block, stats)

    def spy(self: select.RankMask) -> None:
        abandoned.append(threading.current_thread().name)
        abandon(self)

    monkeypatch.setattr(TaskMerge, "combine", broken)
    monkeypatch.setattr(select.RankMask, "abandon", spy)
    recipe = write(tmp_path / "recipe.yml", WITH_STATISTICS["ties"](job))
    failures: list[BaseException] = []

    def merge() -> None:
        try:
            merged(recipe, tmp_path / "out", 2, NMODEL_BLOCKS)
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=merge, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the merge waits for a chunk that failed"
    assert [str(e) for e in failures] == ["lane 1 failed"]
    assert "lane 1" in abandoned


def test_each_lane_computes_with_one_torch_thread() -> None:
    """torch's thread count is per thread: the lanes' is 1, the caller's is as it was."""
    before = torch.get_num_threads()
    lanes: Lanes[int] = Lanes(2, lambda: 0)
    seen: list[int] = []
    try:
        lanes.run(lambda _, item: seen.append(torch.get_num_threads()), range(8))
        with pytest.raises(ZeroDivisionError):
            lanes.run(lambda _, item: 1 // item, [1, 0, 2])
        lanes.run(lambda _, item: seen.append(item), [5])  # still working after a failure
    finally:
        lanes.close()
    assert seen == [1] * 8 + [5]
    assert torch.get_num_threads() == before


def test_the_estimate_counts_each_lanes_chunk(job: Path, lane_threads: set[str]) -> None:
    """Lanes share the budget's blocks; each adds its own chunk's buffers, no more."""
    plan = build_plan(load_recipe(job))
    t = max(plan.tensors, key=lambda t: t.nbytes if t.action == "compute" else 0)
    one = budget.working_memory(t, BLOCKS, 1, 1)
    two = budget.working_memory(t, BLOCKS, 1, 2)
    chunk = budget.chunk_rows(t, budget.block_rows(t, BLOCKS), 1)
    assert budget.tensor_lanes(t, BLOCKS, 2) == 2
    assert 0 < two - one <= chunk * (budget._per_row(t) + 2 * 4 * 8)
    assert budget.estimate_peak(plan, BLOCKS, 1, 2) >= budget.estimate_peak(plan, BLOCKS, 1, 1)


def test_the_estimate_counts_the_lanes_of_a_statistics_method(
    job: Path, tmp_path: Path, lane_threads: set[str]
) -> None:
    """A method with statistics passes computes in lanes too: each lane's chunk, and its
    part of a pass's histograms, are in the estimate."""
    plan = build_plan(load_recipe(write(tmp_path / "r.yml", WITH_STATISTICS["ties"](job))))
    t = max(plan.tensors, key=lambda t: t.nbytes if t.action == "compute" else 0)
    assert t.method is not None and t.method.stat_passes()
    assert budget.tensor_lanes(t, NMODEL_BLOCKS, 2) == 2
    one = budget.working_memory(t, NMODEL_BLOCKS, 1, 1)
    two = budget.working_memory(t, NMODEL_BLOCKS, 1, 2)
    chunk = budget.chunk_rows(t, budget.block_rows(t, NMODEL_BLOCKS), 1)
    parts = 2 * len(t.inputs) * budget.STAT_PART
    mapped = len(t.inputs) * budget.MAPPED_AROUND  # pages around the second lane's reads
    assert two - one == chunk * budget._per_row(t) + parts + mapped
