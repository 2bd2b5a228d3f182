"""Nothing silent, nothing surprising: what a newcomer meets on a first merge says what
happened and what to do, in one line (refusals, repeats, limits, the card, inspect)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from lazymerge.recipe import load_recipe, parse_recipe

from conftest import make_adapter, run_cli

NOOP = (
    "lazymerge: error: the output would be the base's weights: every tensor takes ratio 0 "
    "and no adapter applies; --allow-noop merges anyway\n"
)


def blend_recipe(
    models: dict[str, Path], directory: Path, values: list[float], lora: bool = True
) -> Path:
    loras = [{"path": str(models["lora"])}] if lora else []
    recipe = {
        "base": str(models["base"]),
        "other": {"model": str(models["other"]), "loras": loras},
        "gradient": {"values": values, "layers": [0, 4]},
    }
    path = directory / "blend.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def stamps(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def merged(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete merge, for the tests that merge into it again."""
    root = tmp_path_factory.mktemp("complete")
    recipe = blend_recipe(models, root, [0.5, 0.0])
    assert run_cli("merge", recipe, "-o", root / "out", "-q") == 0
    return root / "out"


# --allow-noop: every command that plans refuses a merge that changes nothing.


def test_gradient_at_ratio_zero_is_refused_unless_allowed(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = stamps(models["base"])
    args = ["gradient", models["base"], models["other"], "--values", "0", "-o", tmp_path / "o"]
    capsys.readouterr()
    assert run_cli(*args, "-q") == 1
    assert capsys.readouterr().err == NOOP
    assert not (tmp_path / "o").exists() and stamps(models["base"]) == before
    assert run_cli(*args, "-q", "--allow-noop") == 0
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()


def test_an_untrained_lora_is_refused_by_lora(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    untrained = make_adapter(models["base"], tmp_path / "new", seed=5, init_lora_weights=True)
    capsys.readouterr()
    assert run_cli("lora", models["base"], untrained, "-o", tmp_path / "o", "-q") == 1
    assert capsys.readouterr().err == (
        f"lazymerge: error: {untrained}: LoRA on base looks untrained: each of its deltas has "
        "an all-zero factor (PEFT initialises lora_B to zeros), so it changes nothing; "
        "--allow-noop merges anyway\n"
    )
    assert not (tmp_path / "o").exists()


def test_batch_fails_a_noop_recipe_and_merges_it_when_allowed(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = blend_recipe(models, tmp_path, [0.0], lora=False)
    capsys.readouterr()
    assert run_cli("batch", recipe, "--out-root", tmp_path / "root", "-q") == 1
    assert (
        capsys.readouterr().err
        == f"lazymerge: error: {recipe}: {NOOP[len('lazymerge: error: ') :]}"
    )
    assert not (tmp_path / "root" / "blend").exists()
    assert run_cli("batch", recipe, "--out-root", tmp_path / "root", "-q", "--allow-noop") == 0
    assert (tmp_path / "root" / "blend" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("command", ["merge", "lora", "gradient", "plan", "batch"])
def test_every_planning_command_offers_allow_noop(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(command, "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--allow-noop Merge even when the recipe changes nothing (an untrained LoRA, a rule "
        "no tensor matches, all ratios 0)." in text
    )


# Merging again into a complete output.


def test_a_complete_output_is_not_merged_into_again(
    models: dict[str, Path], merged: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = merged.parent / "blend.yaml"
    before = stamps(merged)
    capsys.readouterr()
    assert run_cli("merge", recipe, "-o", merged, "-q") == 1
    assert capsys.readouterr().err == (
        f"lazymerge: error: output {merged} already holds a complete merge (lazymerge verify "
        f"{merged} checks it); pass --overwrite to replace it\n"
    )
    assert stamps(merged) == before


def test_resume_into_a_complete_output_says_so_and_rewrites_nothing(
    merged: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = merged.parent / "blend.yaml"
    before = stamps(merged)
    capsys.readouterr()
    assert run_cli("merge", recipe, "-o", merged, "--resume") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(
        f"{merged}: already complete (this recipe, these inputs); nothing rewritten ("
    ) and out.endswith(f"; lazymerge verify {merged} rehashes them)\n")
    assert stamps(merged) == before
    assert run_cli("merge", recipe, "-o", merged, "--resume", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["already_complete"] and result["bytes_written"] == 0
    assert result["kept"] == [s["name"] for s in result["shards"]]
    assert result["bytes_kept"] == sum(s["size"] for s in result["shards"])
    assert stamps(merged) == before


def test_resume_into_a_complete_merge_of_another_recipe_is_refused(
    models: dict[str, Path], merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = blend_recipe(models, tmp_path, [0.7, 0.0])
    before = stamps(merged)
    capsys.readouterr()
    assert run_cli("merge", other, "-o", merged, "-q", "--resume") == 1
    assert capsys.readouterr().err == (
        f"lazymerge: error: {merged / 'lazymerge.json'}: the recipe changed since the first "
        "attempt; cannot resume: start over with --overwrite\n"
    )
    assert stamps(merged) == before


# The picture's mode.


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_the_picture_gets_the_mode_open_gives(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    umask: int,
    mode: int,
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("LAZYMERGE_NO_PICTURE")
    old = os.umask(umask)
    try:
        recipe = blend_recipe(models, tmp_path, [0.5, 0.0])
        assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE((out / "blend.png").stat().st_mode) == mode
    assert stat.S_IMODE((out / "README.md").stat().st_mode) == mode  # like every other file


# Values below what can take effect.


def test_a_shard_size_below_the_largest_tensor_is_said(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = blend_recipe(models, tmp_path, [0.5, 0.0])
    capsys.readouterr()
    assert run_cli("merge", recipe, "-o", tmp_path / "o", "-q", "--shard-size", "1KB") == 0
    shards = len(list((tmp_path / "o").glob("model-*.safetensors")))
    # The largest tensors: gate_proj, up_proj and down_proj, 160 x 64 float32.
    assert capsys.readouterr().err == (
        "lazymerge: warning: shard size 1000 B is below the largest tensor (40.00 KiB): "
        f"tensors larger than a shard get a shard of their own ({shards} shards)\n"
    )


def test_a_memory_budget_below_one_row_block_is_said(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lazymerge.plan import build_plan
    from lazymerge.run.budget import estimate_peak
    from lazymerge.views.report import human_bytes

    recipe = blend_recipe(models, tmp_path, [0.5, 0.0])
    peak = human_bytes(estimate_peak(build_plan(load_recipe(recipe)), 1000))
    capsys.readouterr()
    assert run_cli("plan", recipe, "--max-memory", "1KB") == 0
    # The widest computed rows: down_proj's, 160 float32 columns: 12 bytes of buffers a
    # value and the two inputs' mapped 640-byte rows, 3200 bytes a row, 64 rows.
    assert capsys.readouterr().err == (
        "lazymerge: warning: --max-memory 1000 B is below one 64-row block of the widest "
        f"tensor (200.00 KiB): blocks of 64 rows are used, about {peak} peak\n"
    )
    assert run_cli("merge", recipe, "-o", tmp_path / "o", "-q", "--max-memory", "1KB") == 0
    assert "--max-memory 1000 B is below one 64-row block" in capsys.readouterr().err
    assert run_cli("plan", recipe, "--max-memory", "1MB") == 0  # enough: nothing to say
    assert capsys.readouterr().err == ""


def test_batch_says_it_too(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = blend_recipe(models, tmp_path, [0.5, 0.0])
    capsys.readouterr()
    args = ["--out-root", tmp_path / "root", "-q", "--shard-size", "1KB"]
    assert run_cli("batch", recipe, *args) == 0
    shards = len(list((tmp_path / "root" / "blend").glob("model-*.safetensors")))
    assert capsys.readouterr().err == (
        f"lazymerge: warning: {recipe}: shard size 1000 B is below the largest tensor "
        f"(40.00 KiB): tensors larger than a shard get a shard of their own ({shards} shards)\n"
    )
    assert run_cli("batch", recipe, *args) == 0  # skipped, complete: nothing to say
    assert capsys.readouterr().err == ""


# The model card.


def hub_named(models: dict[str, Path], root: Path) -> dict[str, Path]:
    """Copies of the models whose config.json names their Hub ids (_name_or_path); the
    other's README names its own parent as base_model, which is not the other's id."""
    base, other = (
        shutil.copytree(models["base"], root / "b"),
        shutil.copytree(models["other"], root / "o"),
    )
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "TheBloke/Llama-2-13B-fp16"})
    )
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "jondurbin/airoboros-l2-13b-gpt4-2.0"})
    )
    (other / "README.md").write_text("---\nbase_model: meta-llama/Llama-2-13b-hf\n---\n")
    return {"base": base, "other": other, "lora": models["lora"]}


def test_the_card_names_hub_ids_from_metadata_and_paths_relative_to_it(
    models: dict[str, Path], tmp_path: Path
) -> None:
    named = hub_named(models, tmp_path)
    recipe = blend_recipe(named, tmp_path, [0.5, 0.0])
    out = tmp_path / "merges" / "mine"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == [  # not the other's parent, from its README
        "TheBloke/Llama-2-13B-fp16",
        "jondurbin/airoboros-l2-13b-gpt4-2.0",
    ]
    block = card.split("```yaml\n")[1].split("```")[0]
    data = yaml.safe_load(block)
    assert data["base"]["model"] == "../../b" and data["other"]["model"] == "../../o"
    assert data["other"]["loras"][0]["path"] == os.path.relpath(models["lora"], out)
    assert parse_recipe(data, out) == load_recipe(recipe)
    assert "Install lazymerge 0.1.0 from its source (it is not on PyPI)" in card
    assert "pip install .    # in a checkout of lazymerge 0.1.0's source\n" in card
    assert "lazymerge merge recipe.yaml -o ../mine-again    # in this directory\n" in card
    assert "pip install lazymerge==" not in card and "pypi.org" not in card


def test_a_local_name_is_not_made_a_hub_id(models: dict[str, Path], tmp_path: Path) -> None:
    named = hub_named(models, tmp_path)
    config = json.loads((named["base"] / "config.json").read_text())
    (named["base"] / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "/home/me/models/chronos"})
    )
    recipe = blend_recipe(named, tmp_path, [0.5, 0.0])
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    front = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == ["jondurbin/airoboros-l2-13b-gpt4-2.0"]  # not "b"


# inspect, and the flags' help.


def test_inspect_an_adapter_without_a_recorded_base(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = shutil.copytree(models["lora"], tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (lora / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run_cli("inspect", lora) == 0
    text = capsys.readouterr().out
    assert "LoRA: r 4 (x56); lora_alpha 8; rsLoRA False; base model not recorded\n" in text
    assert "model.layers.0.mlp.gate_proj.weight     [160, 64]  lora  scale 2\n" in text
    assert run_cli("inspect", models["lora"]) == 0
    assert f"base model {models['other']}\n" in capsys.readouterr().out  # as PEFT saved it


@pytest.mark.parametrize("command", ["lora", "gradient"])
def test_dtype_help_of_commands_without_a_recipe(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(command, "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--dtype TEXT Output dtype: float16, bfloat16 or float32 (default: the base's)." in text
    assert "recipe's" not in text


# The output directory.


def test_an_output_that_cannot_be_created_says_why(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    recipe = blend_recipe(models, tmp_path, [0.5, 0.0])
    capsys.readouterr()
    assert run_cli("merge", recipe, "-o", "/proc/x", "-q") == 1
    assert capsys.readouterr().err == (
        "lazymerge: error: cannot create output directory /proc/x: /proc does not accept new "
        "directories; choose a directory on a disk\n"
    )
    (tmp_path / "file").write_text("x")
    assert run_cli("merge", recipe, "-o", tmp_path / "file" / "out", "-q") == 1
    assert capsys.readouterr().err == (
        f"lazymerge: error: cannot create output directory {tmp_path / 'file' / 'out'}: "
        f"{tmp_path / 'file'} is not a directory\n"
    )
