"""A merge that would quietly do nothing is refused before anything is written, with one
line saying why; `--allow-noop` merges anyway."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import save_file

from lazymerge.plan import build_plan
from lazymerge.plan.noop import noop_reasons
from lazymerge.recipe import load_recipe

from conftest import load_merged, make_adapter, run_cli

ALLOW = "; --allow-noop merges anyway"


def write_recipe(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def blend(models: dict[str, Path], gradient: Any, loras: list[Any] | None = None) -> dict[str, Any]:
    other: dict[str, Any] = {"model": str(models["other"]), "loras": loras or []}
    return {"base": str(models["base"]), "other": other, "gradient": gradient}


def refused(capsys: pytest.CaptureFixture[str], recipe: Path, out: Path, message: str) -> None:
    capsys.readouterr()
    assert run_cli("merge", recipe, "-o", out, "-q") == 1
    err = capsys.readouterr().err
    assert err == f"lazymerge: error: {message}{ALLOW}\n"
    assert not out.exists()  # refused from the plan: nothing written
    assert run_cli("plan", recipe) == 1  # plan shows what merge does: the same refusal
    assert capsys.readouterr().err == err


@pytest.fixture(scope="module")
def untrained(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA as PEFT makes it before training: lora_B all zeros."""
    root = tmp_path_factory.mktemp("untrained")
    return make_adapter(models["other"], root / "lora", seed=5, init_lora_weights=True)


def test_an_adapter_with_no_tensors(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = tmp_path / "empty"
    shutil.copytree(models["lora"], lora)
    save_file({}, str(lora / "adapter_model.safetensors"))
    recipe = write_recipe(tmp_path, blend(models, {"values": [0.5]}, [str(lora)]))
    refused(
        capsys,
        recipe,
        tmp_path / "out",
        f"{lora}: LoRA on other holds no tensors; it changes nothing",
    )


def test_an_untrained_lora(
    models: dict[str, Path], untrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, blend(models, {"values": [0.5]}, [str(untrained)]))
    refused(
        capsys,
        recipe,
        tmp_path / "out",
        f"{untrained}: LoRA on other looks untrained: each of its deltas has an all-zero "
        "factor (PEFT initialises lora_B to zeros), so it changes nothing",
    )


def test_an_untrained_embedding_lora_has_zero_a(models: dict[str, Path], tmp_path: Path) -> None:
    """PEFT initialises an embedding LoRA's A (not B) to zeros: still untrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(models["other"], dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    get_peft_model(model, config).save_pretrained(tmp_path / "emb", save_embedding_layers=False)
    gradient = {"values": [0.5], "rest": 0.5}  # the embeddings are outside the layers
    recipe = write_recipe(tmp_path, blend(models, gradient, [str(tmp_path / "emb")]))
    assert "looks untrained" in next(noop_reasons(build_plan(load_recipe(recipe))))


def test_a_lora_whose_every_target_takes_none_of_its_model(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The gradient blends attention only; the LoRA changes only the MLPs.
    lora = make_adapter(models["other"], tmp_path / "mlp", seed=7, target_modules=["up_proj"])
    gradient = {"filter": "self_attn", "values": [0.5]}
    recipe = write_recipe(tmp_path, blend(models, gradient, [str(lora)]))
    refused(
        capsys,
        recipe,
        tmp_path / "out",
        f"{lora}: LoRA on other changes nothing: every tensor it targets takes 0 of the other",
    )


@pytest.mark.parametrize(
    ("gradient", "message"),
    [
        (
            [
                {"filter": "self_attn", "values": [0.5]},
                {"filter": "no_such_module", "values": [0.3]},
            ],
            "gradient[1] (filter 'no_such_module') decides no tensor",
        ),
        (
            [{"filter": "self_attn", "values": [0.5]}, {"filter": "q_proj", "values": [0.3]}],
            "gradient[1] (filter 'q_proj') decides no tensor",  # rule 0 takes every q_proj
        ),
    ],
)
def test_a_rule_that_decides_no_tensor(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gradient: list[dict[str, Any]],
    message: str,
) -> None:
    recipe = write_recipe(tmp_path, blend(models, gradient))
    refused(
        capsys,
        recipe,
        tmp_path / "out",
        f"{message}: no tensor name contains its filter, or an earlier rule takes every "
        "one it matches",
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("blend", id="every ratio 0"),
        pytest.param("base-only", id="a base and nothing else"),
    ],
)
def test_an_output_equal_to_the_base(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], data: str
) -> None:
    recipe_data = (
        blend(models, {"values": [0.0]}) if data == "blend" else {"base": str(models["base"])}
    )
    recipe = write_recipe(tmp_path, recipe_data)
    refused(
        capsys,
        recipe,
        tmp_path / "out",
        "the output would be the base's weights: every tensor takes ratio 0 and no adapter applies",
    )
    out = tmp_path / "allowed"
    assert run_cli("merge", recipe, "-o", out, "-q", "--allow-noop") == 0
    base, merged = load_merged(models["base"]), load_merged(out)
    assert merged.keys() == base.keys()
    assert all(merged[k].equal(base[k]) for k in base)


def test_a_real_merge_is_not_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """The founding recipe's shape: a trained LoRA, a gradient over the first layers."""
    recipe = write_recipe(
        tmp_path,
        blend(
            models,
            {"values": [0.9, 0.0], "layers": [0, 5]},
            [{"path": str(models["lora"]), "weight": 0.25}],
        ),
    )
    assert list(noop_reasons(build_plan(load_recipe(recipe)))) == []
