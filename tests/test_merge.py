"""The founding recipe end to end, against an independent transformers + PEFT reference."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import (
    N_LAYERS,
    interrupt_after,
    load_merged,
    peft_merge,
    run_cli,
    synthetic_job,
    tiny_config,
)

SPAN = 5  # the founding [0, 25) of 40 layers, scaled to 8


def founding_recipe(models: dict[str, Path], directory: Path, **output: object) -> Path:
    recipe = {
        "base": str(models["base"]),
        "other": {
            "model": str(models["other"]),
            "loras": [{"path": str(models["lora"]), "weight": 0.25}],
        },
        "gradient": {"values": [0.9, 0.0], "layers": [0, SPAN]},
        "output": {"dtype": "float16", "shard_size": "400KB", **output},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def reference_ratio(name: str) -> float:
    """The model card in words: 0.9 at layer 0 down to 0 at layer 24 (scaled: 4), else 0."""
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    layer = int(parts[parts.index("layers") + 1])
    return float(np.linspace(0.9, 0.0, SPAN)[layer]) if layer < SPAN else 0.0


def reference_merge(models: dict[str, Path]) -> dict[str, torch.Tensor]:
    """transformers + PEFT + DESIGN's formula, with none of lazymerge's code."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32).state_dict()
    airolima = peft_merge(models["other"], models["lora"], 0.25)
    out = {}
    for name, b in base.items():
        r = reference_ratio(name)
        out[name] = ((1 - r) * b.float() + r * airolima[name].float()).to(torch.float16)
    return out


@pytest.fixture(scope="module")
def merged(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merged")
    out = root / "out"
    assert run_cli("merge", founding_recipe(models, root), "-o", out, "-q") == 0
    return out


def test_fixture_models_are_sharded(models: dict[str, Path]) -> None:
    assert len(list(models["base"].glob("model-*.safetensors"))) > 1


def test_founding_recipe_equals_reference(models: dict[str, Path], merged: Path) -> None:
    ours = load_merged(merged)
    ref = reference_merge(models)
    assert set(ours) == set(ref)
    exact = total = 0
    for name, r in ref.items():
        assert ours[name].dtype == torch.float16, name
        # LoRA products are summed in a different order than PEFT's (addmm vs B@A * s),
        # so a value that lies on an fp16 rounding boundary may differ by one ulp.
        torch.testing.assert_close(ours[name], r, rtol=2**-10, atol=2**-24)
        exact += int((ours[name] == r).sum())
        total += r.numel()
    assert exact / total > 0.999
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.7.mlp.up_proj.weight"):  # fmt: skip
        assert torch.equal(ours[name], ref[name]), name  # ratio 0: base, one cast, exact


def test_output_loads_in_transformers_with_reference_logits(
    models: dict[str, Path], merged: Path
) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in reference_merge(models).items()})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)


def test_shards_index_config_and_manifest(models: dict[str, Path], merged: Path) -> None:
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert [p.name for p in shards] == [
        f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)
    ]
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    total = 0
    for p in shards:
        with safe_open(str(p), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            assert all(index["weight_map"][n] == p.name for n in names)
            total += sum(f.get_tensor(n).numel() * 2 for n in names)
        (n,) = np.frombuffer(p.read_bytes()[:8], dtype="<u8")
        assert (8 + n) % 8 == 0  # header padded like safetensors' own
    assert index["metadata"]["total_size"] == total
    assert not list(merged.glob("*.partial"))

    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert config["num_hidden_layers"] == N_LAYERS
    assert (merged / "generation_config.json").read_bytes() == (
        models["base"] / "generation_config.json"
    ).read_bytes()

    manifest = json.loads((merged / "lazymerge.json").read_text())
    for p in shards:
        assert manifest["shards"][p.name] == {
            "size": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
    assert manifest["tensors"]["model.layers.1.self_attn.q_proj.weight"]["ratio"] == pytest.approx(
        0.675
    )
    assert manifest["tensors"]["model.layers.1.self_attn.q_proj.weight"]["other_loras"] == [
        str(models["lora"])
    ]
    assert (
        manifest["tensors"]["model.layers.6.mlp.up_proj.weight"]["action"] == "compute"
    )  # fp32 -> fp16
    assert len(manifest["inputs"]) == len(list(models["base"].glob("*.safetensors"))) * 2 + 1


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_byte_identical_across_runs_and_row_blocks(
    models: dict[str, Path], merged: Path, tmp_path: Path
) -> None:
    recipe = founding_recipe(models, tmp_path)
    assert run_cli("merge", recipe, "-o", tmp_path / "again", "-q") == 0
    assert shard_bytes(tmp_path / "again") == shard_bytes(merged)
    # A 16 KiB budget forces every matrix through many row blocks.
    assert run_cli("merge", recipe, "-o", tmp_path / "blocks", "-q", "--max-memory", "16KiB") == 0
    assert shard_bytes(tmp_path / "blocks") == shard_bytes(merged)


def test_ratio_zero_and_one_copy_source_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "gradient",
        models["base"],
        models["other"],
        "--values",
        "1",
        "--layers",
        "0:2",
        "-o",
        out,
        "-q",
    ]
    assert run_cli(*args) == 0
    ours, base, other = load_merged(out), load_merged(models["base"]), load_merged(models["other"])
    manifest = json.loads((out / "lazymerge.json").read_text())["tensors"]
    for name, t in ours.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        src = other if layer is not None and layer < 2 else base
        assert torch.equal(t, src[name]), name
        assert manifest[name]["action"] == ("copy-other" if src is other else "copy-base")


def test_gradient_command_equals_recipe(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {"base": str(models["base"]), "other": str(models["other"]),
              "gradient": {"values": [0.9, 0.3, 0.0], "layers": [1, 7], "rest": 0.1}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "a", "-q") == 0
    args = ["--values", "0.9,0.3,0", "--layers", "1:7", "--rest", "0.1", "-o", tmp_path / "b", "-q"]
    assert run_cli("gradient", models["base"], models["other"], *args) == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    ours, base, other = (
        load_merged(tmp_path / "a"),
        load_merged(models["base"]),
        load_merged(models["other"]),
    )
    name = "model.layers.4.mlp.down_proj.weight"  # anchors at layers 1, 3.5, 6: layer 4 = 0.3 - 0.3 * 0.5 / 2.5
    r = 0.3 - 0.3 * (0.5 / 2.5)
    torch.testing.assert_close(
        ours[name], (1 - r) * base[name] + r * other[name], rtol=0, atol=1e-7
    )
    name = "lm_head.weight"
    torch.testing.assert_close(ours[name], 0.9 * base[name] + 0.1 * other[name], rtol=0, atol=1e-7)


def error_of(capsys: pytest.CaptureFixture[str], *args: object, rc: int = 1) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    assert run_cli(*args) == rc  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("lazymerge: error: ") or rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_output_directory_rules(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = founding_recipe(models, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert (
        "is not empty; pass --resume to continue an interrupted merge or --overwrite"
        in error_of(capsys, "merge", recipe, "-o", out, "-q")
    )
    assert run_cli("merge", recipe, "-o", out, "-q", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces merge files only
    assert "overlaps input" in error_of(
        capsys, "merge", recipe, "-o", models["other"], "--overwrite"
    )
    assert "overlaps input" in error_of(capsys, "merge", recipe, "-o", models["lora"] / "sub")
    before = {p.name: p.stat().st_mtime_ns for p in models["base"].iterdir()}
    assert "overlaps input" in error_of(
        capsys, "lora", models["base"], models["lora"], "-o", models["base"]
    )
    assert {p.name: p.stat().st_mtime_ns for p in models["base"].iterdir()} == before
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in error_of(capsys, "merge", recipe, "-o", tmp_path / "file")


def test_span_past_the_last_layer(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = error_of(
        capsys,
        "gradient",
        models["base"],
        models["other"],
        "--values",
        "0.9,0",
        "--layers",
        "0:25",
        "-o",
        tmp_path / "o",
    )
    assert (
        "gradient[0].layers: span [0, 25) goes past the last layer; the models have 8 layers (0..7)"
        in err
    )
    assert not (tmp_path / "o").exists()


def save_llama(directory: Path, **changes: int) -> Path:
    from transformers import LlamaForCausalLM

    config = tiny_config()
    for key, value in changes.items():
        setattr(config, key, value)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_mismatched_models(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shallow = save_llama(tmp_path / "shallow", num_hidden_layers=6)
    err = error_of(
        capsys, "gradient", models["base"], shallow, "--values", "0.5", "-o", tmp_path / "o"
    )
    assert (
        "has 8 layers but other" in err
        and "has 6; a layer gradient needs models of the same depth" in err
    )
    narrow = save_llama(tmp_path / "narrow", hidden_size=32)
    err = error_of(
        capsys, "gradient", models["base"], narrow, "--values", "0.5", "-o", tmp_path / "o"
    )
    # Embeddings have ratio 0 here, so the first blended tensor is the one refused.
    assert "model.layers.0.self_attn.q_proj.weight: base" in err
    assert "has shape [64, 64] but other" in err and "has [64, 32]" in err
    assert not (tmp_path / "o").exists()


def test_cli_flag_errors(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = ["gradient", models["base"], models["other"], "-o", tmp_path / "o"]
    assert "--values: 'a,b' is not a comma-separated list" in error_of(
        capsys, *g, "--values", "a,b"
    )
    assert "--shard-size: 'huge' is not a size" in error_of(
        capsys, *g, "--values", "1", "--shard-size", "huge"
    )
    assert "--dtype: unknown dtype 'fp8'" in error_of(capsys, *g, "--values", "1", "--dtype", "fp8")
    assert "--max-memory: '0' is not a size" in error_of(
        capsys, *g, "--values", "1", "--max-memory", "0"
    )
    assert "does not exist" in error_of(
        capsys,
        "gradient",
        tmp_path / "nope",
        models["other"],
        "--values",
        "1",
        "-o",
        tmp_path / "o",
    )
    assert "cannot read recipe" in error_of(
        capsys, "merge", tmp_path / "none.yaml", "-o", tmp_path / "o"
    )
    assert run_cli("merge") == 2
    assert "Missing argument 'RECIPE'" in capsys.readouterr().err


def test_interrupt_leaves_visibly_incomplete_output(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (resume, SIGTERM, SIGKILL and a full disk: tests/test_resume.py, tests/test_hostile.py)
    interrupt_after(monkeypatch, 40)
    out = tmp_path / "out"
    assert run_cli("merge", founding_recipe(models, tmp_path), "-o", out, "-q") == 130
    assert "interrupted; the output is incomplete" in capsys.readouterr().err
    assert list(out.glob("*.partial")) and not (out / "model.safetensors.index.json").exists()


def test_bytes_do_not_depend_on_the_memory_budget(tmp_path: Path) -> None:
    """Row blocks of different sizes must not change a LoRA product's rounding."""
    from lazymerge.testing import LlamaShape

    shape = LlamaShape(layers=1, hidden=512, intermediate=1536, heads=8, kv_heads=8, vocab=300)
    recipe = synthetic_job(tmp_path, shape, {"values": [0.6]})
    outputs = []
    for budget in ("512MiB", "3MiB", "1MiB", "1KiB"):
        out = tmp_path / f"out-{budget}"
        assert run_cli("merge", recipe, "-o", out, "-q", "--max-memory", budget) == 0
        outputs.append(shard_bytes(out))
    assert all(o == outputs[0] for o in outputs[1:])


def test_dtype_conversion_is_one_rounding(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--values", "0.5", "--layers", "0:1", "--dtype", "bfloat16", "-o", out, "-q"]
    assert run_cli("gradient", models["base"], models["other"], *args) == 0
    ours, base, other = load_merged(out), load_merged(models["base"]), load_merged(models["other"])
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config  # the base's key, updated
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16
        r = 0.5 if ".layers.0." in name else 0.0
        assert torch.equal(t, ((1 - r) * base[name] + r * other[name]).to(torch.bfloat16)), name


def test_loras_on_both_sides_equal_reference(models: dict[str, Path], tmp_path: Path) -> None:
    from conftest import make_adapter

    base_lora = make_adapter(models["base"], tmp_path / "base-lora", seed=7, r=2, lora_alpha=5)
    recipe = {
        "base": {"model": str(models["base"]), "loras": [{"path": str(base_lora), "weight": 0.5}]},
        "other": {
            "model": str(models["other"]),
            "loras": [{"path": str(models["lora"]), "weight": 0.25}],
        },
        "gradient": {"values": [0.2, 1.0], "layers": [2, 7], "rest": 0.0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q") == 0
    ours = load_merged(tmp_path / "out")
    base = peft_merge(models["base"], base_lora, 0.5)
    other = peft_merge(models["other"], models["lora"], 0.25)
    ratios = dict(zip(range(2, 7), np.linspace(0.2, 1.0, 5).tolist(), strict=True))
    for name, b in base.items():
        parts = name.split(".")
        r = ratios.get(int(parts[2]), 0.0) if parts[1] == "layers" else 0.0
        torch.testing.assert_close(ours[name], (1 - r) * b + r * other[name], rtol=1e-6, atol=1e-7)
    # Layer 6 is pure other: the base's LoRA does not matter there and is not applied.
    manifest = json.loads((tmp_path / "out" / "lazymerge.json").read_text())["tensors"]
    assert manifest["model.layers.6.mlp.up_proj.weight"]["base_loras"] == []
    assert manifest["model.layers.1.mlp.up_proj.weight"]["base_loras"] == [str(base_lora)]


def test_progress_on_stderr_summary_on_stdout_quiet_silences_both(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["gradient", models["base"], models["other"], "--values", "0.9,0", "--layers", "0:5"]
    assert run_cli(*args, "-o", tmp_path / "a") == 0
    out, err = capsys.readouterr()
    assert "merging" in err and "B/s" in err
    assert (
        "    1  0.6750" in out
        and "peak memory (RSS)" in out
        and "model-00001-of-00001.safetensors" in out
    )
    assert run_cli(*args, "-o", tmp_path / "b", "--quiet") == 0
    assert capsys.readouterr() == ("", "")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("merge", "lora", "gradient"):
        assert run_cli(command, "--help") == 0
        text = capsys.readouterr().out
        assert "Example: lazymerge " + command in text and "--max-memory" in text
    assert run_cli("--version") == 0
    assert "lazymerge, version" in capsys.readouterr().out
