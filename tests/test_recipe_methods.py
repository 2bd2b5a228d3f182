"""N-model recipes and mergekit configs as recipes: what they mean (spec values), and the
one line every bad one gets, naming the key, before anything is read or written."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lazymerge.errors import RecipeError
from lazymerge.recipe.parse import parse_recipe
from lazymerge.recipe.spec import Conditional


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for name in ("base", "a", "b", "lora"):
        (tmp_path / name).mkdir()
    return tmp_path


def native(**overrides: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "method": "ties",
        "base": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": [0.9, 0.3]}},
            {
                "model": "b",
                "loras": [{"path": "lora", "weight": 0.25}],
                "parameters": {"weight": 0.5},
            },
        ],
        "parameters": {
            "normalize": False,
            "density": [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}],
        },
        "seed": 7,
    }
    return recipe | overrides


def mergekit(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "base"},
            {"model": "a+lora", "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "parameters": {"int8_mask": True},
        "dtype": "bfloat16",
        "out_dtype": "torch.float16",
        "random_seed": 3,
    }
    return config | overrides


def error(data: dict[str, Any], root: Path) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, root, "r.yml")
    message = str(e.value)
    assert "\n" not in message
    return message


def test_native_recipe_means_what_it_says(dirs: Path) -> None:
    r = parse_recipe(native(), dirs, "r.yml")
    assert r.merge is not None and r.other is None
    m = r.merge
    assert (m.name, m.seed, m.base_at, m.compute, m.source) == ("ties", 7, None, None, "lazymerge")
    assert [e.model.path for e in m.models] == [dirs / "a", dirs / "b"]
    assert m.models[0].parameters["density"] == (Conditional(None, (0.9, 0.3)),)
    assert m.models[1].model.loras[0].weight == 0.25
    assert m.parameters["density"] == (Conditional("self_attn", (0.2,)), Conditional(None, (0.6,)))
    assert r.inputs() == [dirs / "base", dirs / "a", dirs / "b", dirs / "lora"]


def test_mergekit_config_means_what_mergekit_says(dirs: Path) -> None:
    r = parse_recipe(mergekit(), dirs, "c.yml")
    m = r.merge
    assert m is not None
    assert (m.name, m.seed, m.base_at, m.compute, m.source) == (
        "dare_ties",
        3,
        0,
        "BF16",
        "mergekit",
    )
    assert r.output.dtype == "F16"
    assert r.base.path == dirs / "base"
    lora = m.models[1].model
    assert lora.path == dirs / "a" and [lo.path for lo in lora.loras] == [dirs / "lora"]
    assert lora.loras[0].weight == 1.0  # model+lora: the LoRA at full strength
    assert parse_recipe(mergekit(dtype=None), dirs, "c.yml").merge.compute == "inputs"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "tie"}, "method: unknown method 'tie'"),
        ({"parameters": {"densty": 0.5}}, "parameters.densty: ties has no parameter 'densty'"),
        (
            {"models": [{"model": "a", "parameters": {"normalize": True}}]},
            "models[0].parameters.normalize: normalize is method-wide",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": "lots"}}]},
            "models[0].parameters.weight: weight is a number",
        ),
        ({"parameters": {"normalize": 1}}, "parameters.normalize: normalize is true or false"),
        ({"parameters": {"density": []}}, "parameters.density: an empty list"),
        (
            {"parameters": {"density": [{"filter": "mlp"}]}},
            "parameters.density[0]: 'value' is required",
        ),
        (
            {"models": [{"model": "base"}]},
            "models: ties merges at least 1 model, besides the base; this config has 0",
        ),
        ({"models": [{"model": "a"}, {"model": "a"}]}, "models[1]:"),
        (
            {"models": [{"model": "a", "parameters": {"weight": 1}, "lora": "x"}]},
            "unknown key 'lora'",
        ),
        ({"seed": -1}, "seed: expected a non-negative integer"),
        ({"models": []}, "models: expected a list"),
    ],
)
def test_bad_native_recipe_is_one_line(dirs: Path, change: dict[str, Any], expected: str) -> None:
    assert expected in error(native(**change), dirs)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"merge_method": "slerpy"}, "merge_method: unknown method 'slerpy'"),
        ({"mystery": 1}, "mystery: not a mergekit config key"),
        ({"slices": [{"sources": []}]}, "give models or slices, not both"),
        ({"tokenizer_source": "b"}, "tokenizer_source: "),
        ({"tokenizer_source": 3}, "tokenizer_source: expected base, union or a model"),
        (
            {"tokenizer_source": "base", "tokenizer": {"source": "union"}},
            "give tokenizer_source or a tokenizer: block, not both",
        ),
        (
            {"tokenizer": {"source": "union", "pad_to_multiple_of": 0}},
            "pad_to_multiple_of: expected a positive integer",
        ),
        (
            {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a"}}}}},
            "model_token takes model and one of token, token_id",
        ),
        ({"chat_template": "chatmI"}, "chat_template: 'chatmI' is neither a built-in template"),
        ({"modules": {"text": {"models": []}}}, "give models or modules, not both"),
        ({"dtype": "fp16"}, "dtype: 'fp16' is not a dtype mergekit knows"),
        ({"base_model": None}, "base_model: dare_ties needs a base model"),
        (
            {"models": [{"model": "base", "parameters": {"weight": 1.0}}, {"model": "a"}]},
            "dare_ties takes no weight for the base",
        ),
        ({"models": [{"model": "a+"}]}, "ends with '+'"),
        ({"random_seed": "x"}, "random_seed: expected a non-negative integer"),
    ],
)
def test_bad_mergekit_config_is_one_line(dirs: Path, change: dict[str, Any], expected: str) -> None:
    assert expected in error(mergekit(**change), dirs)


def test_mergekit_linear_without_base_takes_the_first_model(dirs: Path) -> None:
    models = [{"model": "a"}, {"model": "b", "parameters": {"weight": 2.0}}]
    cfg = mergekit(
        merge_method="linear", base_model=None, models=models, parameters={"weight": 1.0}
    )
    r = parse_recipe(cfg, dirs, "c.yml")
    assert r.base.path == dirs / "a" and r.merge is not None and r.merge.base_at == 0


def test_to_dict_is_the_same_recipe_again(dirs: Path) -> None:
    """The manifest and the card record recipe.to_dict(): parsed again, the same merge (a
    mergekit config's precision kept as the native `compute`)."""
    for data in (native(), native(compute="float16"), mergekit()):
        r = parse_recipe(data, dirs, "r.yml")
        again = parse_recipe(r.to_dict(), dirs, "again.yml")
        assert again.merge is not None and r.merge is not None
        assert again.merge == dataclasses.replace(r.merge, source="lazymerge")
        assert (again.base, again.output) == (r.base, r.output)


@pytest.mark.parametrize(
    ("method", "models", "expected"),
    [
        (
            "slerp",
            ["a", "b"],
            "slerp merges exactly 2 models, the base included; this config has 3",
        ),
        ("nuslerp", ["a"], "nuslerp merges exactly 2 models, besides the base; this config has 1"),
        (
            "model_stock",
            ["a"],
            "model_stock merges at least 3 models, the base included; this config has 2",
        ),
    ],
)
def test_a_method_given_the_wrong_number_of_models_is_one_line(
    dirs: Path, method: str, models: list[str], expected: str
) -> None:
    entries = [
        {"model": m, "parameters": {"weight": 0.5}} if method == "nuslerp" else {"model": m}
        for m in models
    ]
    params = {"t": 0.5} if method == "slerp" else {}
    assert expected in error(mergekit(merge_method=method, models=entries, parameters=params), dirs)
