"""plan / plot / inspect / model card / --json: what people look at must match what merge does."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lazymerge.recipe import load_recipe, parse_recipe

from conftest import N_LAYERS, run_cli


@pytest.fixture(scope="module")
def recipe(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("views")
    data = {
        "base": str(models["base"]),
        "other": {
            "model": str(models["other"]),
            "loras": [{"path": str(models["lora"]), "weight": 0.25}],
        },
        "gradient": [
            {"filter": "self_attn", "values": [0.8, 0.2]},
            {"filter": "mlp", "values": [0.9, 0.0], "layers": [0, 5]},
        ],
        "output": {"dtype": "float16", "shard_size": "400KB"},
    }
    path = root / "airolima-rules.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_json_agrees_with_what_merge_does(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("plan", recipe, "--json", "--max-memory", "64KiB") == 0
    plan = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q", "--max-memory", "64KiB") == 0
    manifest = json.loads((out / "lazymerge.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert [t["name"] for t in plan["tensors"]] == list(manifest["tensors"])
    for t in plan["tensors"]:
        m = manifest["tensors"][t["name"]]
        assert (t["action"], t["ratio"], t["other_loras"]) == (
            m["action"],
            m["ratio"],
            m["other_loras"],
        )
        assert index["weight_map"][t["name"]] == t["shard"]
    assert {s["name"]: s["size"] for s in plan["shards"]} == {
        n: s["size"] for n, s in manifest["shards"].items()
    }
    assert plan["bytes_to_write"] == sum((out / s["name"]).stat().st_size for s in plan["shards"])
    rows = {r["layer"]: r for r in plan["layers"]}
    assert rows[1]["ratios"] == {
        "self_attn": pytest.approx(0.8 - 0.6 / 7),
        "mlp": pytest.approx(0.675),
        "no rule": 0.0,
    }
    assert rows[6]["ratios"]["mlp"] == 0.0 and rows[None]["ratios"] == {"no rule": 0.0}
    assert rows[1]["loras"]["other: lora"] == pytest.approx(
        0.25 * (0.8 - 0.6 / 7)
    )  # max over the layer
    assert plan["estimated_peak_rss"] > 200 * 2**20


def test_plan_text(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("plan", recipe) == 0
    text = capsys.readouterr().out
    assert "    0  self_attn 0.8000, mlp 0.9000, no rule 0.0000" in text
    assert " rest  no rule 0.0000" in text
    assert "shard(s) of at most" in text and "about" in text and "peak" in text


def test_plot_png_svg_and_errors(
    recipe: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run_cli("plot", recipe, "-o", tmp_path / "blend.png") == 0
    png = (tmp_path / "blend.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert run_cli("plot", recipe, "-o", tmp_path / "blend.svg") == 0
    svg = (tmp_path / "blend.svg").read_text()
    assert "<svg" in svg and "airolima-rules" in svg  # the title comes from the recipe
    capsys.readouterr()
    assert run_cli("plot", recipe, "-o", tmp_path / "blend.gif") == 1
    assert "must be one of .png, .svg, .pdf" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert run_cli("plot", recipe, "-o", tmp_path / "x.png") == 1
    assert "pip install 'lazymerge[plot]'" in capsys.readouterr().err


def test_inspect_checkpoint_and_adapter(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaForCausalLM

    expected = LlamaForCausalLM.from_pretrained(models["base"]).num_parameters()
    capsys.readouterr()
    assert run_cli("inspect", models["base"]) == 0
    text = capsys.readouterr().out
    assert "format: safetensors, 6 file(s)" in text and "LlamaForCausalLM (llama)" in text
    assert f"parameters: {expected:,}; decoder layers: {N_LAYERS}" in text
    assert "more (--all lists every tensor)" in text
    assert run_cli("inspect", models["base"], "--all") == 0
    assert capsys.readouterr().out.count(".weight") == 2 + 9 * N_LAYERS + 1
    assert run_cli("inspect", models["lora"]) == 0
    text = capsys.readouterr().out
    assert "LoRA: r 4 (x56); lora_alpha 8; rsLoRA False" in text
    assert (
        "targets: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (56 base tensors"
        in text
    )
    assert "model.layers.0.self_attn.q_proj.weight  [64, 64]   lora  scale 2" in text
    touches = text.split("touches:\n")[1].splitlines()[:-1]  # the last: "... 44 more"
    assert len({row.index(" lora ") for row in touches}) == 1  # the columns line up


def test_model_card(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAZYMERGE_NO_PICTURE")
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {  # no base_model: the inputs' metadata names no Hub id
        "tags": ["merge", "lazymerge", "lora"],
        "library_name": "transformers",
    }
    assert (
        "# airolima-rules" in card
        and "![per-layer blend" in card
        and (out / "blend.png").stat().st_size > 10_000
    )
    assert "LoRA `lora` at weight 0.25" in card
    # The recipe in the card is a recipe: it loads back to the one that was run, its
    # paths relative to the output directory.
    block = card.split("```yaml\n")[1].split("```")[0]
    assert parse_recipe(yaml.safe_load(block), out) == load_recipe(recipe)
    assert str(tmp_path) not in block
    assert "lazymerge merge recipe.yaml -o ../out-again" in card


def test_merge_json_on_stdout_progress_on_stderr(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "--json") == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    result = json.loads(out)
    assert "merging" in err
    for shard in result["shards"]:
        data = (tmp_path / "out" / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["size"] == len(data)
    assert result["bytes_written"] == sum(s["size"] for s in result["shards"])
    assert result["peak_rss"] > 0 and result["seconds"] > 0


def test_python_m_lazymerge_version_and_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lazymerge", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "lazymerge, version 0.1.0"
    for command in ("plan", "plot", "inspect"):
        done = subprocess.run(
            [sys.executable, "-m", "lazymerge", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"Example: lazymerge {command}" in done.stdout


def test_card_without_matplotlib_still_written(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The picture is drawn in a child process: hide matplotlib from it.
    fake = tmp_path / "hide" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hide"))
    monkeypatch.delenv("LAZYMERGE_NO_PICTURE")
    args = ["--values", "0.5", "-o", tmp_path / "out", "-q"]
    assert run_cli("gradient", models["base"], models["other"], *args) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# out" in card and "## Per-layer blend" in card
    assert "blend.png" not in card and not (tmp_path / "out" / "blend.png").exists()
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_lora_in_a_peft_subfolder_shows_its_own_weight(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PEFT saves a named adapter in a subfolder; the recipe names the folder above it.
    plan, the card and the plot must show the recipe's weight times the layer's share
    (0.25 x 0.9 at layer 0), not the share alone."""
    from lazymerge.plan import build_plan
    from lazymerge.views.report import layer_rows

    shutil.copytree(models["lora"], tmp_path / "adapters" / "mine")
    data = {
        "base": str(models["base"]),
        "other": {"model": str(models["other"]), "loras": [{"path": "adapters", "weight": 0.25}]},
        "gradient": {"values": [0.9, 0.0], "layers": [0, 5]},
    }
    path = tmp_path / "sub.yaml"
    path.write_text(yaml.safe_dump(data))
    assert run_cli("plan", path, "--json") == 0
    rows = {r["layer"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows[0]["loras"] == {"other: mine": pytest.approx(0.225)}
    assert rows[4]["loras"] == {}  # ratio 0 there: the other, and its LoRA, are not read
    pictured = {r.layer: r.loras for r in layer_rows(build_plan(load_recipe(path)))}
    assert pictured[0] == {"other: mine": pytest.approx(0.225)}
    assert run_cli("merge", path, "-o", tmp_path / "out", "-q") == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "other: mine 0.2250" in card and "0.9000" in card


def test_plan_says_which_rule_decided_each_tensor(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("plan", recipe, "--json") == 0
    tensors = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert tensors["model.layers.3.self_attn.k_proj.weight"]["rule"] == 0
    assert tensors["model.layers.3.mlp.up_proj.weight"]["rule"] == 1
    assert tensors["model.layers.3.input_layernorm.weight"]["rule"] is None
    # mlp: 0.9 falling to 0 over layers 0-4, so 0.9 * (1 - 3/4) of the other at layer 3
    assert tensors["model.layers.3.mlp.up_proj.weight"]["method"] == "linear 0.7750, 0.2250"
    # No rule: ratio 0, the base alone (cast from float32 to the recipe's float16)
    assert tensors["model.layers.3.input_layernorm.weight"]["method"] == "linear 1.0000"
