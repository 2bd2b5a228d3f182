from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lazymerge.errors import RecipeError
from lazymerge.recipe import GradientRule, load_recipe, parse_size

FOUNDING = Path(__file__).resolve().parents[1] / "examples" / "airolima-chronos.yaml"


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for name in ("base", "other", "lora"):
        (tmp_path / name).mkdir()
    return tmp_path


def write(dirs: Path, data: object) -> Path:
    p = dirs / "recipe.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


GOOD = {
    "base": "./base",
    "other": {"model": "./other", "loras": [{"path": "./lora", "weight": 0.25}]},
    "gradient": {"values": [0.9, 0.0], "layers": [0, 25]},
    "output": {"dtype": "float16", "shard_size": "500MiB"},
}


def test_good_recipe_resolves_paths_against_the_recipe_file(dirs: Path) -> None:
    r = load_recipe(write(dirs, GOOD))
    assert r.base.path == dirs / "base"
    assert r.other is not None and r.other.path == dirs / "other"
    assert r.other.loras[0].path == dirs / "lora" and r.other.loras[0].weight == 0.25
    assert r.gradient == (GradientRule(values=(0.9, 0.0), layers=(0, 25)),)
    assert r.output.dtype == "F16" and r.output.shard_size == 500 * 2**20


def test_founding_recipe_parses(tmp_path: Path) -> None:
    data = yaml.safe_load(FOUNDING.read_text())
    assert data["other"]["loras"][0]["weight"] == 0.25
    assert data["gradient"] == {"values": [0.9, 0.0], "layers": [0, 25]}


def with_(path: tuple[str, ...], value: object) -> dict:  # type: ignore[type-arg]
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**GOOD, "colour": "blue"}, "recipe.yaml: unknown key 'colour'; allowed: ['base', 'gradient', 'layers_prefix', 'other', 'output']"),
        (with_(("gradient", "valeus"), [1]), "gradient: unknown key 'valeus'"),
        (with_(("gradient", "values"), ["a", 0]), "gradient.values[0]: expected a number, got 'a'"),
        (with_(("gradient", "values"), [1.5]), "gradient.values[0]: 1.5 is outside [0.0, 1.0]"),
        (with_(("gradient", "values"), []), "gradient.values: expected a list of ratios"),
        (with_(("gradient", "layers"), [-1, 5]), "gradient.layers: [-1, 5] is not a span"),
        (with_(("gradient", "layers"), [5, 5]), "gradient.layers: [5, 5] is not a span"),
        (with_(("gradient", "layers"), [0, "x"]), "gradient.layers: expected [start, end]"),
        (with_(("gradient", "rest"), True), "gradient.rest: expected a number, got True"),
        (with_(("gradient", "over"), "tensors"), "gradient.layers: not used with over: tensors"),
        (with_(("gradient", "over"), "blocks"), "gradient.over: 'blocks'; use 'layers' or 'tensors'"),
        (with_(("other", "loras"), [{"path": "./lora", "weight": "heavy"}]), "other.loras[0].weight: expected a number"),
        (with_(("other", "loras"), [{"path": "./missing"}]), "other.loras[0].path: "),
        (with_(("other", "model"), "./nowhere"), "nowhere does not exist"),
        (with_(("output", "dtype"), "int8"), "output.dtype: unknown dtype 'int8'"),
        (with_(("output", "shard_size"), "lots"), "output.shard_size: 'lots' is not a size"),
        ({"other": "./other"}, "'base' is required"),
        ({"base": "./base", "other": "./other"}, "no 'gradient' says how to blend it"),
        ({"base": "./base", "gradient": {"values": [1]}}, "'gradient' needs an 'other' model"),
        ("base: [unclosed", "not valid YAML at line 1"),
        ("just a string", "expected a mapping"),
    ],
)  # fmt: skip
def test_bad_recipes_name_the_key(dirs: Path, data: object, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(dirs, data))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2GB", 2 * 10**9),
        ("500MiB", 500 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("4096", 4096),
        (123, 123),
        ("10 kb", 10_000),
    ],
)
def test_sizes(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["0", "-1GB", "2XB", "", 0, None])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(RecipeError, match="is not a size"):
        parse_size(text)
