"""Zero-copy passthrough: tensors copied as-is go file to file in the kernel
(copy_file_range) on filesystems where that pays, hash the same, and fall back to plain
writes where the OS says no."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lazymerge.plan import COMPUTE, COPY_BASE, build_plan
from lazymerge.recipe import load_recipe
from lazymerge.testing import LlamaShape
from lazymerge.write.disk import CLONING_FS, filesystem, kernel_copy_pays

from conftest import run_cli, synthetic_job

SHAPE = LlamaShape(layers=4, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)
REAL = os.copy_file_range


@pytest.fixture(autouse=True)
def kernel_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's ext4 would choose plain writes (measured faster there)."""
    monkeypatch.setenv("LAZYMERGE_COPY_RANGE", "always")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layers 2-3 and the norms are the base's as-is (ratio 0): copied tensors."""
    root = tmp_path_factory.mktemp("passthrough")
    return synthetic_job(
        root, SHAPE, {"values": [0.5, 0.0], "layers": [0, 2]}, output={"shard_size": "1MB"}
    )


def merged(recipe: Path, out: Path) -> dict[str, bytes]:
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    manifest = json.loads((out / "lazymerge.json").read_text())
    for name, rec in manifest["shards"].items():  # the recorded hash is the file's
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == rec["sha256"]
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def copied(recipe: Path) -> dict[str, str]:
    """Copied tensor -> the model directory it is copied from, per the plan."""
    plan = build_plan(load_recipe(recipe))
    return {
        t.name: "base" if t.action == COPY_BASE else "other"
        for t in plan.tensors
        if t.action != COMPUTE
    }


def copied_bytes(recipe: Path) -> int:
    return sum(t.nbytes for t in build_plan(load_recipe(recipe)).tensors if t.action != COMPUTE)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's shards, read by the safetensors library."""
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_copied_tensors_go_file_to_file(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def spy(src: int, dst: int, count: int, *at: Any) -> int:
        n = REAL(src, dst, count, *at)
        calls.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", spy)
    kernel = merged(job, tmp_path / "kernel")
    assert sum(calls) == copied_bytes(job) > 0  # every copied byte, and nothing else
    # each copied tensor is its input's, as an independent reader sees both
    out, sources = (
        tensors(tmp_path / "kernel"),
        {m: tensors(job.parent / m) for m in ("base", "other")},
    )
    for name, side in copied(job).items():
        assert torch.equal(out[name], sources[side][name]), name

    def refuse(*args: Any) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert merged(job, tmp_path / "plain") == kernel


@pytest.mark.parametrize("limit", [4096, 0])
def test_short_copies_finish_with_plain_writes(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """A copy that stops short (4 KiB a call), or copies nothing (0: "not here"), still
    ends with every byte in place."""
    reference = merged(job, tmp_path / "reference")
    calls = {"n": 0}

    def short(src: int, dst: int, count: int, *at: Any) -> int:
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            return 0  # now and then the kernel declines
        return REAL(src, dst, min(count, limit), *at) if limit else 0

    monkeypatch.setattr(os, "copy_file_range", short)
    assert merged(job, tmp_path / "short") == reference
    assert calls["n"] > 0


def test_the_kernel_copy_is_chosen_by_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAZYMERGE_COPY_RANGE", "auto")
    assert filesystem(Path("/proc")) == "proc"
    assert filesystem(tmp_path) != ""
    assert kernel_copy_pays(tmp_path) == (filesystem(tmp_path) in CLONING_FS)
    monkeypatch.setenv("LAZYMERGE_COPY_RANGE", "never")
    assert not kernel_copy_pays(tmp_path)


def test_plain_writes_where_the_kernel_copy_does_not_pay(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAZYMERGE_COPY_RANGE", "never")

    def forbidden(*args: Any) -> int:
        raise AssertionError("copy_file_range used")

    reference = merged(job, tmp_path / "reference")
    monkeypatch.setattr(os, "copy_file_range", forbidden)
    assert merged(job, tmp_path / "plain") == reference
