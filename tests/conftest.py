"""Fixtures: tiny random Llama checkpoints and PEFT adapters made by transformers + PEFT.

These come from the libraries people really use, not from lazymerge's own generator, so
the merge is checked against checkpoints and adapters lazymerge did not write.
"""

from __future__ import annotations

import json
import os
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
    """Make the n-th tensor's write raise KeyboardInterrupt, as a Ctrl-C would."""
    from lazymerge.run import shard

    real, calls = shard.write_tensor, {"n": 0}

    def write_tensor(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shard, "write_tensor", write_tensor)


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
