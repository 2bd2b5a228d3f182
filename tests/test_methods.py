"""The method interface: a method sees blocks of fp32 rows and nothing else; the executor
streams them (twice, for a method that asks for whole-tensor statistics first)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.meaning.methods import Block, Linear, Method
from lazymerge.meaning.methods.registry import BUILDERS
from lazymerge.plan import COMPUTE, MergePlan, build_plan
from lazymerge.recipe import load_recipe
from lazymerge.run.merge import run_merge
from lazymerge.run.options import MergeOptions
from lazymerge.testing import LlamaShape, write_llama


@dataclasses.dataclass
class FakeBlock:
    """Block over in-memory inputs; records which inputs were read."""

    inputs: list[torch.Tensor]
    start: int
    stop: int
    shared: int
    read: list[int] = dataclasses.field(default_factory=list)

    def rows(self, i: int, n: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.read.append(i)
        have = min(self.stop, self.inputs[i].shape[0]) - self.start
        rows = self.inputs[i][self.start : self.start + (have if n is None else n)]
        return rows.to(dtype or torch.float32, copy=True)


def test_linear_is_a_weighted_sum_in_input_order() -> None:
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(8, 5, generator=gen) for _ in range(3)]
    block = FakeBlock(x, 0, 8, 8)
    got = Linear((0.5, 0.3, 0.2)).combine(block)
    # fp32, each input scaled, then added left to right
    want = (x[0] * 0.5 + x[1] * 0.3) + x[2] * 0.2
    assert torch.equal(got, want)
    assert set(BUILDERS) >= {"linear", "ties", "dare_ties", "della", "sce"}


def test_linear_keeps_rows_only_the_base_has_and_never_reads_a_zero_weight() -> None:
    gen = torch.Generator().manual_seed(1)
    base, other, unused = (torch.randn(6, 4, generator=gen) for _ in range(3))
    block = FakeBlock([base, other[:4], unused], 0, 6, 4)
    got = Linear((0.0, 1.0, 0.0)).combine(block)
    assert torch.equal(got[:4], other[:4]) and torch.equal(got[4:], base[4:])
    assert block.read == [0, 1]  # input 2 weighs 0: not read
    block = FakeBlock([base, other, unused], 2, 6, 4)
    assert torch.equal(Linear((0.25, 0.75, 0.0)).combine(block), base[2:] * 0.25 + other[2:] * 0.75)
    with pytest.raises(ValueError, match="every weight is 0"):
        Linear((0.0, 0.0)).combine(FakeBlock([base, other], 0, 6, 6))


class _SumSquares:
    """float64 sums of squares of both inputs, and the rows seen, over a whole tensor."""

    def __init__(self) -> None:
        self.sums = [0.0, 0.0]
        self.rows = 0

    def update(self, block: Block) -> None:
        for i in (0, 1):
            self.sums[i] += float(block.rows(i).double().square().sum())
        self.rows += block.stop - block.start

    def result(self) -> float:
        FIRST_PASS_ROWS.append(self.rows)
        return (self.sums[0] / self.sums[1]) ** 0.5


FIRST_PASS_ROWS: list[int] = []  # per tensor, the rows its first pass saw


@dataclasses.dataclass(frozen=True)
class NormMatch(Method):
    """The other's rows scaled to the base's Frobenius norm: needs the whole tensor first."""

    name = "norm-match"

    def stat_passes(self) -> int:
        return 1

    def stats_pass(self, k: int, prior: Any) -> _SumSquares:
        return _SumSquares()

    def combine(self, block: Block, stats: Any = None) -> torch.Tensor:
        return block.rows(1).mul_(stats)


def with_method(plan: MergePlan, method: Method) -> MergePlan:
    """The plan with every computed two-input tensor made by `method` instead."""

    def swap(t: Any) -> Any:
        two = t.action == COMPUTE and len(t.inputs) == 2
        return dataclasses.replace(t, method=method) if two else t

    shards = tuple(
        dataclasses.replace(s, tensors=tuple(swap(t) for t in s.tensors)) for s in plan.shards
    )
    return dataclasses.replace(
        plan, shards=shards, tensors=tuple(t for s in shards for t in s.tensors)
    )


def test_a_two_pass_method_gets_whole_tensor_statistics(tmp_path: Path) -> None:
    shape = LlamaShape(layers=2, hidden=64, intermediate=160, heads=4, kv_heads=4, vocab=300)
    write_llama(tmp_path / "base", shape, seed=1, dtype=torch.float32)
    write_llama(tmp_path / "other", shape, seed=2, dtype=torch.float32)
    recipe = {"base": "base", "other": "other", "gradient": {"values": [0.5]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    plan = with_method(build_plan(load_recipe(tmp_path / "r.yaml")), NormMatch())
    # A small budget: up_proj [160, 64] goes in 64-row blocks, so both passes span blocks.
    FIRST_PASS_ROWS.clear()
    run_merge(plan, tmp_path / "out", MergeOptions(max_memory=48 * 2**10, progress=False))
    swapped = [t.rows for t in plan.tensors if isinstance(t.method, NormMatch)]
    assert swapped == FIRST_PASS_ROWS and 160 in swapped  # every row, once per tensor
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(f))
    base = {}
    other = {}
    for d, into in (("base", base), ("other", other)):
        for f in sorted((tmp_path / d).glob("*.safetensors")):
            into.update(load_file(f))
    name = "model.layers.1.mlp.up_proj.weight"
    b, o = base[name].double(), other[name].double()
    scale = (b.square().sum() / o.square().sum()).sqrt()
    assert torch.equal(out[name], other[name] * float(scale))
    assert float(out[name].norm()) == pytest.approx(float(base[name].norm()), rel=1e-6)
    kept = "model.embed_tokens.weight"  # ratio 0 outside the layers: the base's bytes
    assert torch.equal(out[kept], base[kept])
