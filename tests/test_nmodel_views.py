"""An N-model merge as people see it: the plot draws every model's weight share and
density per layer, `plan --json` and the manifest record each tensor's method and
parameters, the card names the method, every model and the per-layer table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lazymerge.plan import build_plan
from lazymerge.recipe import load_recipe, parse_recipe
from lazymerge.views import nmodel
from lazymerge.views.plot import share_picture

from conftest import run_cli
from mergekit_ref import N_LAYERS, Family, make_family

SELF_ATTN = 4  # q, k, v, o of each layer
PER_LAYER = 9  # and gate, up, down, the two norms

# models[0]'s density, and the method-wide one models[2] takes: gradients over the layers
DENSITY0 = (0.9, 0.3)
DENSITY_TOP = (0.2, 0.6, 1.0)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    root = tmp_path_factory.mktemp("nmodel-views")
    family = make_family(root, torch.float16, seed=5)
    config = family.finetunes[0] / "config.json"  # as a model downloaded from the Hub says
    config.write_text(
        json.dumps(json.loads(config.read_text()) | {"_name_or_path": "someone/ft-math"})
    )
    return family


def write(family: Family, tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ties(family: Family, tmp_path: Path) -> Path:
    a, b, c = family.finetunes
    return write(family, tmp_path, "ties-three", {
        "method": "ties",
        "base": str(family.base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5, "density": list(DENSITY0)}},
            {"model": str(b), "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
            {"model": str(c), "parameters": {"weight": [{"filter": "self_attn", "value": 0.6}, {"value": 0.3}]}},
        ],
        "parameters": {"density": list(DENSITY_TOP)},
    })  # fmt: skip


def longhand(anchors: tuple[float, ...], layer: int | None) -> float:
    """A gradient's value at a layer: its anchors interpolated at t = layer / (L - 1);
    outside the layers, t = 0."""
    t = 0.0 if layer is None else layer / (N_LAYERS - 1)
    x = t * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    return anchors[i] + (x - i) * (anchors[i + 1] - anchors[i])


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def test_plot_draws_every_models_share(family: Family, tmp_path: Path) -> None:
    recipe = ties(family, tmp_path)
    assert run_cli("plot", recipe, "-o", tmp_path / "ties.png") == 0
    png = (tmp_path / "ties.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert run_cli("plot", recipe, "-o", tmp_path / "ties.svg") == 0
    svg = (tmp_path / "ties.svg").read_text()
    for model in family.finetunes:  # the legend: each model by its directory's name
        assert model.name in svg
    assert "weight share" in svg and "density" in svg and "ties-three" in svg


def test_picture_rows_are_each_models_mean_share(family: Family, tmp_path: Path) -> None:
    """Per layer, each model's weight averaged over the layer's tensors (a filter makes
    them differ), as a share of the layer's total; its density likewise."""
    picture = share_picture(build_plan(load_recipe(ties(family, tmp_path))))
    a, b, c = (m.name for m in family.finetunes)
    assert picture["method"] == "ties"
    assert picture["labels"] == [family.base.name, a, b, c]
    rows = {r["layer"]: r for r in picture["rows"]}
    assert list(rows) == [*range(N_LAYERS), None]
    for layer, row in rows.items():
        mean_c = (
            (SELF_ATTN * 0.6 + (PER_LAYER - SELF_ATTN) * 0.3) / PER_LAYER
            if layer is not None
            else 0.3
        )
        weights = {a: 0.5, b: longhand((0.2, 0.8), layer), c: mean_c}
        total = sum(weights.values())
        assert row["shares"] == {n: pytest.approx(w / total) for n, w in weights.items()}
        assert row["densities"] == {
            a: pytest.approx(longhand(DENSITY0, layer)),
            b: 0.5,
            c: pytest.approx(longhand(DENSITY_TOP, layer)),
        }
        assert row["topk"] is None


@pytest.mark.parametrize("method", ["linear", "sce", "dare_ties"])
def test_plot_of_other_methods(family: Family, tmp_path: Path, method: str) -> None:
    """linear weighs the base too (a negative weight hangs below the line); sce has no
    weight: its select_topk and a line saying why; a mergekit config draws the same way."""
    a, b, _ = family.finetunes
    if method == "dare_ties":
        data: dict[str, Any] = {
            "merge_method": method, "base_model": str(family.base), "dtype": "float16",
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": [1.0, 0.5]}} for m in (a, b)],
        }  # fmt: skip
    else:
        models = [{"model": str(a), "parameters": {"weight": [-0.2, 0.8]}}, {"model": str(b)}]
        params = {"weight": 0.4} if method == "linear" else {"select_topk": [0.3, 0.9]}
        if method == "sce":
            models = [{"model": str(m)} for m in (a, b)]
        data = {"method": method, "base": str(family.base), "models": models, "parameters": params}
    recipe = write(family, tmp_path, method, data)
    assert run_cli("plot", recipe, "-o", tmp_path / "p.svg") == 0
    svg = (tmp_path / "p.svg").read_text()
    assert a.name in svg and b.name in svg
    rows = share_picture(build_plan(load_recipe(recipe)))["rows"]
    if method == "sce":
        assert "SCE keeps the elements that vary most" in svg
        assert [r["topk"] for r in rows[:N_LAYERS]] == pytest.approx([0.3, 0.5, 0.7, 0.9])
    elif method == "linear":
        assert family.base.name in svg  # linear weighs the base too
        assert rows[0]["shares"][a.name] == pytest.approx(-0.2 / 1.0)
    else:
        assert rows[-2]["densities"] == {a.name: 0.5, b.name: 0.5}


def test_plan_json_and_manifest_record_each_tensors_parameters(
    family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = ties(family, tmp_path)
    capsys.readouterr()
    assert run_cli("plan", recipe, "--json") == 0
    tensors = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    for name, t in tensors.items():
        layer, inputs = layer_of(name), t["parameters"]["inputs"]
        assert list(inputs) == ["base", "models[0]", "models[1]", "models[2]"]
        assert inputs["base"] == {}  # ties takes no weight or density for the base
        assert inputs["models[0]"]["density"] == pytest.approx(longhand(DENSITY0, layer))
        assert inputs["models[1]"]["weight"] == pytest.approx(longhand((0.2, 0.8), layer))
        assert inputs["models[2]"]["density"] == pytest.approx(longhand(DENSITY_TOP, layer))
        assert inputs["models[2]"]["weight"] == (0.6 if "self_attn" in name else 0.3)
        assert t["parameters"]["shared"] == {
            "int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0,
        }  # fmt: skip
        assert t["method"].startswith("ties w=") and t["passes"] == 3  # magnitude ranks: 2
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    manifest = json.loads((out / "lazymerge.json").read_text())["tensors"]
    assert list(manifest) == list(tensors)
    for name, m in manifest.items():
        keys = ("action", "method", "parameters", "loras", "passes", "base_loras", "other_loras")
        assert {k: m[k] for k in keys} == {k: tensors[name][k] for k in keys}


def test_card_names_the_method_every_model_and_the_table(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAZYMERGE_NO_PICTURE")
    recipe = ties(family, tmp_path)
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "base_model": ["someone/ft-math"],  # the one model whose config names a Hub id
        "tags": ["merge", "lazymerge", "ties"],
        "library_name": "transformers",
    }
    assert "- **method**: ties, float32 arithmetic, one rounding" in card
    assert f"- **base**: `{family.base.name}`" in card
    for i, model in enumerate(family.finetunes):
        assert f"- **models[{i}]**: `{model.name}`" in card
    table = "\n".join(nmodel.method_table(build_plan(load_recipe(recipe))))
    assert (
        "## Per-layer parameters\n\n![per-layer parameters" in card and f"```\n{table}\n```" in card
    )
    assert "## Per-layer blend" not in card
    assert (out / "blend.png").stat().st_size > 10_000  # drawn by the child process
    block = card.split("```yaml\n")[1].split("```")[0]
    assert parse_recipe(yaml.safe_load(block), out) == load_recipe(recipe)
    assert str(tmp_path) not in block


def test_card_of_a_merge_without_a_picture(family: Family, tmp_path: Path) -> None:
    """LAZYMERGE_NO_PICTURE (the test suite's default): the table, no picture."""
    out = tmp_path / "out"
    assert run_cli("merge", ties(family, tmp_path), "-o", out, "-q") == 0
    card = (out / "README.md").read_text()
    assert "## Per-layer parameters\n\n```\nlayer  shared" in card
    assert "blend.png" not in card and not (out / "blend.png").exists()


def test_founding_tensors_record_what_they_always_did(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The founding recipe's manifest and `plan --json` keys are unchanged."""
    data = {
        "base": str(models["base"]),
        "other": str(models["other"]),
        "gradient": {"values": [0.9, 0.1]},
    }
    for t in build_plan(parse_recipe(data, tmp_path)).tensors:
        assert list(t.describe()) == ["ratio", "action", "base_loras", "other_loras"]
    recipe = tmp_path / "founding.yaml"
    recipe.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert run_cli("plan", recipe, "--json") == 0
    for t in json.loads(capsys.readouterr().out)["tensors"]:
        assert list(t) == [
            "name", "action", "ratio", "method", "rule", "dtype", "shape", "shard", "offset",
            "nbytes", "base_loras", "other_loras",
        ]  # fmt: skip
