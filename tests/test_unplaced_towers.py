"""A mergekit config's gradient on a modular architecture that meaning/modules.py has no
table for (Qwen2-VL here): mergekit gives the vision tower's layers positions of their
own, lazymerge would give them t = 0 — refused in one line where it changes a value,
merged where it does not (constant parameters, or the decoder's own tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lazymerge.testing import LlamaShape, write_llama

from conftest import run_cli


def qwen2_vl(directory: Path, seed: int) -> Path:
    """A Llama-shaped decoder plus a two-block vision tower, named as Qwen2-VL's."""
    write_llama(directory, LlamaShape(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=4, vocab=64), seed=seed)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tower = {f"visual.blocks.{i}.mlp.fc1.weight": torch.randn(16, 8, generator=gen).half() for i in range(2)}  # fmt: skip
    save_file(tower, directory / "visual.safetensors")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(tower, "visual.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def merge(tmp_path: Path, weight: Any) -> tuple[int, str]:
    a, b = qwen2_vl(tmp_path / "a", 1), qwen2_vl(tmp_path / "b", 2)
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(a), "parameters": {"weight": weight}},
        {"model": str(b), "parameters": {"weight": 1.0}}]}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    return run_cli("merge", tmp_path / "c.yml", "-o", tmp_path / "out"), str(tmp_path / "out")


@pytest.mark.parametrize("weight", [[0.2, 0.8], [0.2, 0.8, 0.2]])  # ends alike, still varies
def test_a_gradient_on_its_tower_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weight: list[float]
) -> None:
    rc, out = merge(tmp_path, weight)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "visual.blocks.0.mlp.fc1.weight: a parameter varies over the layers" in err
    assert "Qwen2VLForConditionalGeneration" in err
    assert not Path(out).exists() or not any(Path(out).iterdir())


def test_constant_parameters_merge(tmp_path: Path) -> None:
    """With constant weights t does not matter: the tower is merged, as mergekit would."""
    rc, out = merge(tmp_path, 0.5)
    assert rc == 0
    got: dict[str, torch.Tensor] = {}
    for f in Path(out).glob("*.safetensors"):
        got |= load_file(f)
    name = "visual.blocks.1.mlp.fc1.weight"
    a = load_file(tmp_path / "a" / "visual.safetensors")[name].float()
    b = load_file(tmp_path / "b" / "visual.safetensors")[name].float()
    torch.testing.assert_close(got[name].float(), (0.5 * a + b) / 1.5, rtol=0, atol=1e-6)
