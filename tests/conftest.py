"""Fixtures: tiny random Llama checkpoints and PEFT adapters made by transformers + PEFT.

These come from the libraries people really use, not from lazymerge's own generator, so
the merge is checked against checkpoints and adapters lazymerge did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.cli import main

from mergekit_ref import SKIP_VARIABLE, Mergekit, MergekitUnavailable, llama_config, reference

# Drawing each merge's card picture costs a child process with matplotlib (~1 s); the
# tests that look at the picture turn it back on.
os.environ.setdefault("LAZYMERGE_NO_PICTURE", "1")

# Rotating cross-checks (marker `rotating`): the heavy extras of a check (a second
# dtype, a second executor, more mergekit-harness runs, the memory peaks and benchmark
# smoke runs beyond the first). Every reference keeps a case outside the marker, so each
# run exercises every reference; of the rotating tests one slice in LAZYMERGE_SLICES
# runs. A test's slice is a hash of its node id (adding a test moves no other); the slice
# run is LAZYMERGE_SLICE, else the HEAD commit's hash mod the slice count (each commit
# draws one; rerunning a commit reruns the same tests), else, without git, the UTC day
# number mod the slice count. LAZYMERGE_ALL_TESTS=1 (make test-all) runs them all; so
# does naming one by its node id, or a -m expression that mentions `rotating`.
ALL_TESTS = "LAZYMERGE_ALL_TESTS"
SLICES = "LAZYMERGE_SLICES"
SLICE = "LAZYMERGE_SLICE"
DEFAULT_SLICES = 3
ROTATION = pytest.StashKey[str]()

N_LAYERS = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config():  # type: ignore[no-untyped-def]
    return llama_config(128, 64, 160, N_LAYERS)


def make_llama(directory: Path, seed: int) -> Path:
    """A random fp32 LlamaForCausalLM saved by transformers in several safetensors shards."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # trained norms are not all ones; make the blend visible
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="300KB")
    return directory


def make_adapter(model_dir: Path, directory: Path, seed: int, **lora_kwargs: object) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS, "init_lora_weights": False}
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_llama(root / "base", seed=1)
    other = make_llama(root / "other", seed=2)
    return {
        "base": base,
        "other": other,
        "lora": make_adapter(other, root / "lora", seed=3),
    }


@pytest.fixture(scope="session")
def mergekit() -> Mergekit:
    """mergekit-yaml in its own pinned venv (tests/mergekit_ref.py), built on first use.

    No PyPI is an error naming the fix, not a silent skip: LAZYMERGE_NO_MERGEKIT=1 skips.
    """
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: mergekit reference tests skipped")
    try:
        return reference()
    except MergekitUnavailable as e:
        failure = str(e)
    pytest.fail(failure, pytrace=False)


def _env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f"{low} or more"
        raise pytest.UsageError(f"{name}={raw!r}: expected a whole number {span}")
    return value


def _slice_of(nodeid: str, slices: int) -> int:
    """The slice of a rotating test: its node id's hash, whatever else is collected."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "big") % slices


def _rotation(config: pytest.Config, slices: int) -> tuple[int, str]:
    """The slice this run takes, and why."""
    if os.environ.get(SLICE, "").strip():
        chosen = _env_int(SLICE, 0, 0, slices - 1)
        return chosen, f"{SLICE}={chosen}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=config.rootpath, capture_output=True, text=True,
            check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        return int(head, 16) % slices, f"commit {head[:10]}"
    except (OSError, subprocess.SubprocessError, ValueError):
        day = int(time.time() // 86400)
        return day % slices, f"UTC day {day}"


def _named(config: pytest.Config) -> list[str]:
    """Node ids named on the command line (`path::test[...]`), relative to the rootdir."""
    named = []
    for arg in config.args:
        path, sep, rest = arg.partition("::")
        if not sep:
            continue
        where = (config.invocation_params.dir / path).resolve()
        if where.is_relative_to(config.rootpath):
            named.append(f"{where.relative_to(config.rootpath).as_posix()}::{rest}")
    return named


def _every_rotating(config: pytest.Config) -> str | None:
    """Why this run takes every rotating test it collects ("" for ALL_TESTS, the -m
    expression for one that names them), or None: it takes one slice."""
    if os.environ.get(ALL_TESTS) == "1":
        return ""
    if "rotating" in (config.option.markexpr or ""):
        return f"as -m {config.option.markexpr!r} selects"
    return None


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rotating = [item for item in items if item.get_closest_marker("rotating")]
    if not rotating:
        return
    if (every := _every_rotating(config)) is not None:
        config.stash[ROTATION] = every if every else f"all {len(rotating)} run ({ALL_TESTS}=1)"
        return
    slices = _env_int(SLICES, DEFAULT_SLICES, 1)
    chosen, why = _rotation(config, slices)
    named = _named(config)
    dropped = {
        id(item)
        for item in rotating
        if _slice_of(item.nodeid, slices) != chosen
        and not any(item.nodeid == n or item.nodeid.startswith((n + "[", n + "::")) for n in named)
    }
    if dropped:
        config.hook.pytest_deselected(items=[item for item in items if id(item) in dropped])
        items[:] = [item for item in items if id(item) not in dropped]
    config.stash[ROTATION] = (
        f"slice {chosen} of 0..{slices - 1} ({why}), {len(rotating) - len(dropped)} of "
        f"{len(rotating)} run; {SLICE}=N picks a slice, {ALL_TESTS}=1 runs all"
    )


def pytest_report_collectionfinish(config: pytest.Config) -> str | None:
    """One line under the collection count (a report header would not show under -q)."""
    rotation = config.stash.get(ROTATION, None)
    return None if rotation is None else f"rotating cross-checks: {rotation}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The same line at the end under pytest-xdist (`make test`), whose workers collect
    and choose the slice, each the same one, out of sight."""
    if not config.pluginmanager.hasplugin("dsession") or _every_rotating(config) is not None:
        return
    chosen, why = _rotation(config, _env_int(SLICES, DEFAULT_SLICES, 1))
    terminalreporter.write_line(
        f"rotating cross-checks: slice {chosen} ({why}); {SLICE}=N picks a slice, "
        f"{ALL_TESTS}=1 runs all"
    )


def session_runs(request: pytest.FixtureRequest, test: object) -> list[pytest.Function]:
    """The cases of `test` (a test function) this session runs, after -k, -m and the
    rotation: what a module fixture that prepares every case at once (one mergekit
    process for all) has to prepare."""
    return [
        item
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.function is test
    ]


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def error_of(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """The one stderr line of a command that must fail with exit 1."""
    capsys.readouterr()
    assert run_cli(*args) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("lazymerge: error: ") and err.count("\n") == 1, err
    return err


def load_merged(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (via the safetensors library)."""
    if not (out / "model.safetensors.index.json").exists():
        return load_file(str(out / "model.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / shard)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def peft_merge(model_dir: Path, adapter_dir: Path, weight: float) -> dict[str, torch.Tensor]:
    """PEFT's own merge of an adapter at `weight` (set_scale), in fp32."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.set_scale(name, weight)
    return {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th tensor's write raise KeyboardInterrupt, as a Ctrl-C would (a copy on
    the copy lane, LAZYMERGE_COPY_LANE=1, counts: it reaches the merge through the writer)."""
    from lazymerge.run import copies, tensor

    calls = {"n": 0}

    def counted(real: Any) -> Any:
        def call(*args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)  # type: ignore[no-any-return]

        return call

    monkeypatch.setattr(tensor, "write_tensor", counted(tensor.write_tensor))
    monkeypatch.setattr(copies.Copier, "copy_ahead", counted(copies.Copier.copy_ahead))


def synthetic_job(
    root: Path,
    shape: Any,
    gradient: dict[str, Any],
    *,
    r: int = 64,
    output: dict[str, Any] | None = None,
    shard_size: int = 2 * 10**9,
    fmt: str = "safetensors",
) -> Path:
    """Random base + other (lazymerge.testing) + a LoRA at 0.25 on the other, and a
    recipe over them at root/recipe.yaml; returns the recipe's path."""
    from lazymerge.testing import write_llama, write_lora

    write_llama(root / "base", shape, seed=1, shard_size=shard_size, fmt=fmt)
    write_llama(root / "other", shape, seed=2, shard_size=shard_size, fmt=fmt)
    write_lora(root / "lora", shape, seed=3, r=r)
    recipe: dict[str, Any] = {
        "base": "base",
        "other": {"model": "other", "loras": [{"path": "lora", "weight": 0.25}]},
        "gradient": gradient,
    }
    if output is not None:
        recipe["output"] = output
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"
