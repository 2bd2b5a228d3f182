"""The recipe family: per-module rules, tensor-ordered gradients, vocab mismatches, the
sister recipe — each against an independent reimplementation of the published formulas
over a transformers state_dict()."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lazymerge.meaning.layers import natural_key

from conftest import load_merged, peft_merge, run_cli, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def state_dict_names() -> list[str]:
    from transformers import LlamaForCausalLM

    return [k for k in LlamaForCausalLM(tiny_config()).state_dict() if "rotary" not in k]


def test_natural_order_is_the_state_dict_order() -> None:
    names = state_dict_names()
    shuffled = random.Random(0).sample(names, len(names))
    assert sorted(shuffled, key=natural_key) == names


def blockmerge_tensors_ratios(values: list[float], n: int) -> list[float]:
    """BlockMerge_Gradient_Tensors as its description reads, written out longhand."""
    if len(values) == 1:
        return [values[0]] * n
    tensors_per_section = n // (len(values) - 1)
    ratios: list[float] = []
    for i in range(len(values) - 1):
        ratios.extend(np.linspace(values[i], values[i + 1], tensors_per_section).tolist())
    while len(ratios) < n:
        ratios.append(values[-1])
    return ratios


def localized(example: str, tmp_path: Path, models: dict[str, Path], **paths: str) -> Path:
    """An example recipe with its model paths pointed at the test's models."""
    recipe = yaml.safe_load((EXAMPLES / example).read_text())
    for key, model in paths.items():
        if isinstance(recipe[key], dict):
            recipe[key]["model"] = str(models[model])
            for lo in recipe[key].get("loras", []):
                lo["path"] = str(models["lora"])
        else:
            recipe[key] = str(models[model])
    recipe["output"] = {"dtype": "float32"}
    path = tmp_path / example
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_tensor_mode_matches_blockmerge_gradient_tensors(
    models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = localized("blockmerge-tensors.yaml", tmp_path, models, base="base", other="other")
    values = yaml.safe_load(recipe.read_text())["gradient"]["values"]
    names = state_dict_names()
    expected = dict(zip(names, blockmerge_tensors_ratios(values, len(names)), strict=True))
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    ours, base, other = (
        load_merged(tmp_path / "out"),
        load_merged(models["base"]),
        load_merged(models["other"]),
    )
    manifest = json.loads((tmp_path / "out" / "lazymerge.json").read_text())["tensors"]
    for name, r in expected.items():
        assert manifest[name]["ratio"] == pytest.approx(r, abs=1e-12), name
        torch.testing.assert_close(
            ours[name], (1 - r) * base[name] + r * other[name], rtol=0, atol=1e-6
        )
    assert expected["model.embed_tokens.weight"] == 0.9 and expected["lm_head.weight"] == 0.5


@pytest.mark.parametrize(
    ("values", "n"), [([0.3], 5), ([1.0, 0.0], 7), ([0.9, 0.5, 0.1, 0.5], 10), ([0, 1, 0], 1)]
)
def test_tensor_ratios_edge_cases(values: list[float], n: int) -> None:
    from lazymerge.meaning.ratios import tensor_ratios

    assert tensor_ratios(values, n) == pytest.approx(blockmerge_tensors_ratios(values, n))


def test_per_module_rules_example(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = localized("mythomix-style.yaml", tmp_path, models, base="base", other="other")
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    ours, base, other = (
        load_merged(tmp_path / "out"),
        load_merged(models["base"]),
        load_merged(models["other"]),
    )
    rules = [("self_attn", (0.8, 0.2)), ("mlp", (0.3, 0.7)), ("layernorm", (0.5, 0.5))]
    for name in state_dict_names():
        r = 0.0
        if ".layers." in name:
            layer = int(name.split(".")[2])
            for needle, (start, end) in rules:
                if needle in name:
                    r = float(np.linspace(start, end, 8)[layer])
                    break
        torch.testing.assert_close(
            ours[name], (1 - r) * base[name] + r * other[name], rtol=0, atol=1e-6, msg=name
        )


def test_sister_recipe_puts_the_lora_on_the_base(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = yaml.safe_load((EXAMPLES / "chronolima-airo.yaml").read_text())
    assert recipe["base"]["loras"] == [{"path": "./limarp-llama2", "weight": 0.25}]
    recipe["base"] = {
        "model": str(models["other"]),
        "loras": [{"path": str(models["lora"]), "weight": 0.25}],
    }
    recipe["other"] = str(models["base"])
    recipe["gradient"]["layers"] = [0, 5]
    recipe["output"] = {"dtype": "float32"}
    (tmp_path / "sister.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("merge", tmp_path / "sister.yaml", "-o", tmp_path / "out", "-q") == 0
    ours, other = load_merged(tmp_path / "out"), load_merged(models["base"])
    chronolima = peft_merge(models["other"], models["lora"], 0.25)
    for name, b in chronolima.items():
        r = (
            float(np.linspace(0.9, 0, 5)[int(name.split(".")[2])])
            if ".layers." in name and int(name.split(".")[2]) < 5
            else 0.0
        )
        torch.testing.assert_close(
            ours[name], (1 - r) * b + r * other[name], rtol=1e-6, atol=1e-6, msg=name
        )


@pytest.mark.parametrize("vocab", [136, 120])
def test_vocab_mismatch_blends_shared_rows(
    models: dict[str, Path], tmp_path: Path, vocab: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaForCausalLM

    config = tiny_config()
    config.vocab_size = vocab
    torch.manual_seed(11)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    args = [
        "gradient",
        models["base"],
        tmp_path / "other",
        "--values",
        "0.6",
        "--rest",
        "0.6",
        "-o",
        tmp_path / "out",
    ]
    capsys.readouterr()
    assert run_cli(*args) == 0
    out_text = capsys.readouterr().out
    ours, base, other = (
        load_merged(tmp_path / "out"),
        load_merged(models["base"]),
        load_merged(tmp_path / "other"),
    )
    shared = min(128, vocab)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[name].shape == base[name].shape
        torch.testing.assert_close(
            ours[name][:shared],
            0.4 * base[name][:shared] + 0.6 * other[name][:shared],
            rtol=0,
            atol=1e-6,
        )
        assert torch.equal(ours[name][shared:], base[name][shared:])  # the base's own extra rows
        kept = (
            f"the base's {128 - shared} extra rows are kept"
            if vocab < 128
            else f"the other's {vocab - 128} extra rows are dropped"
        )
        assert (
            f"{name}: vocabularies differ (128 vs {vocab} rows); blending the {shared} shared rows, {kept}"
            in out_text
        )
