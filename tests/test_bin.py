"""PyTorch .bin checkpoints: read lazily, never by running their pickle."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.mapped import MappedReader

from conftest import load_merged, run_cli

SPAN = 5


def save_bin_shards(state: dict[str, torch.Tensor], directory: Path, n_shards: int) -> Path:
    """Shards + pytorch_model.bin.index.json, written by torch.save (zip format)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for k in range(n_shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        part = {n: state[n] for n in names[k::n_shards]}
        torch.save(part, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def to_bin(src: Path, dst: Path, *, inv_freq: bool = False, views: bool = False) -> Path:
    """The same weights as a 2023-style .bin checkpoint (config and other files copied)."""
    state = load_merged(src)
    if inv_freq:  # what 2023 Llama checkpoints carry in every layer
        for i in range(8):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    if views:
        # embed_tokens and lm_head as views of one storage, lm_head also transposed twice
        # (same values, column-major bytes): shared storage and strides in one go.
        both = torch.cat([state["model.embed_tokens.weight"], state["lm_head.weight"]])
        state["model.embed_tokens.weight"] = both[:128]
        state["lm_head.weight"] = both[128:].t().contiguous().t()
        assert not state["lm_head.weight"].is_contiguous()
    save_bin_shards(state, dst, 3)
    for f in src.glob("*.json"):
        if "index" not in f.name:
            shutil.copy(f, dst / f.name)
    return dst


def adapter_to_bin(src: Path, dst: Path, *, adapter_name: str = "") -> Path:
    dst.mkdir()
    state = load_file(str(src / "adapter_model.safetensors"))
    if adapter_name:  # some PEFT versions saved "lora_A.default.weight"
        state = {k.replace(".weight", f".{adapter_name}.weight"): v for k, v in state.items()}
    torch.save(state, dst / "adapter_model.bin")
    shutil.copy(src / "adapter_config.json", dst)
    return dst


def recipe_file(directory: Path, base: Path, other: Path, lora: Path) -> Path:
    recipe = {
        "base": str(base),
        "other": {"model": str(other), "loras": [{"path": str(lora), "weight": 0.25}]},
        "gradient": {"values": [0.9, 0.0], "layers": [0, SPAN]},
        "output": {"dtype": "float16", "shard_size": "400KB"},
    }
    path = directory / f"recipe-{len(list(directory.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_reader_agrees_with_torch_load(tmp_path: Path) -> None:
    base = torch.randn(10, 8)
    state = {
        "top": base[:5],  # two views of one storage, the second at an offset
        "bottom": base[5:],
        "transposed": torch.randn(8, 6).t(),  # non-contiguous
        "half": torch.randn(4, 3).half(),
        "bf16": torch.randn(2, 5).bfloat16(),
        "param": torch.nn.Parameter(torch.randn(3)),
        "ints": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    expected = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)  # the reference
    index = CheckpointIndex.open(tmp_path)
    assert index.format == "bin" and list(index.tensors) == list(state)
    assert not index["transposed"].contiguous and index["bottom"].contiguous
    with MappedReader() as reader:
        for name, want in expected.items():
            ref = index[name]
            got = reader.rows(ref, 0, ref.rows)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert torch.equal(reader.rows(index["transposed"], 2, 5), expected["transposed"][2:5])


@pytest.fixture(scope="module")
def bins(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bins")
    return {
        "base": to_bin(models["base"], root / "base", inv_freq=True, views=True),
        "other": to_bin(models["other"], root / "other", inv_freq=True),
        "lora": adapter_to_bin(models["lora"], root / "lora", adapter_name="default"),
    }


def test_bin_merge_is_byte_identical_to_safetensors_merge(
    models: dict[str, Path],
    bins: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = recipe_file(tmp_path, models["base"], models["other"], models["lora"])
    assert run_cli("merge", recipe, "-o", tmp_path / "st", "-q") == 0
    expected = shard_bytes(tmp_path / "st")
    recipe = recipe_file(tmp_path, bins["base"], bins["other"], bins["lora"])
    assert run_cli("merge", recipe, "-o", tmp_path / "bin") == 0
    out = capsys.readouterr().out
    assert f"base: {bins['base']} (bin)" in out
    assert "dropped 8 rotary_emb.inv_freq buffers of the base" in out
    assert shard_bytes(tmp_path / "bin") == expected
    index = json.loads((tmp_path / "bin" / "model.safetensors.index.json").read_text())
    assert not any("inv_freq" in name for name in index["weight_map"])
    # Mixed: safetensors base, .bin other, .bin adapter.
    recipe = recipe_file(tmp_path, models["base"], bins["other"], bins["lora"])
    assert run_cli("merge", recipe, "-o", tmp_path / "mixed", "-q") == 0
    assert shard_bytes(tmp_path / "mixed") == expected


def test_single_pytorch_model_bin_and_lora(
    models: dict[str, Path], bins: dict[str, Path], tmp_path: Path
) -> None:
    single = tmp_path / "single"
    single.mkdir()
    torch.save(load_merged(models["other"]), single / "pytorch_model.bin")
    shutil.copy(models["other"] / "config.json", single)
    assert run_cli("lora", single, bins["lora"], "--weight", "0.5", "-o", tmp_path / "a", "-q") == 0
    assert (
        run_cli(
            "lora", models["other"], models["lora"], "--weight", "0.5", "-o", tmp_path / "b", "-q"
        )
        == 0
    )
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_directory_with_both_formats_uses_safetensors(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = tmp_path / "both"
    shutil.copytree(models["base"], both)
    (both / "pytorch_model.bin").write_bytes(b"garbage that must never be read")
    assert run_cli("gradient", both, models["other"], "--values", "0.5", "-o", tmp_path / "o") == 0
    assert f"base: {both} (safetensors (its .bin weights are ignored))" in capsys.readouterr().out


class Payload:
    """What a hostile checkpoint hides: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def error_of(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    capsys.readouterr()
    assert run_cli(*args) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("lazymerge: error: ") and err.count("\n") == 1, err
    return err


def test_malicious_pickle_is_refused_and_never_runs(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    state: dict[str, object] = dict(load_merged(models["other"]))
    state["model.norm.weight"] = Payload(marker)
    torch.save(state, evil / "pytorch_model.bin")
    err = error_of(
        capsys, "gradient", models["base"], evil, "--values", "0.5", "-o", tmp_path / "o"
    )
    assert f"{evil / 'pytorch_model.bin'}: refused pickle global posix.system" in err
    assert not marker.exists()

    adapter = tmp_path / "evil-lora"
    adapter.mkdir()
    shutil.copy(models["lora"] / "adapter_config.json", adapter)
    torch.save({"base_model.model.x.lora_A.weight": Payload(marker)}, adapter / "adapter_model.bin")
    err = error_of(capsys, "lora", models["base"], adapter, "-o", tmp_path / "o")
    assert "adapter_model.bin: refused pickle global posix.system" in err
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def rewrite_pickle(src: Path, dst: Path, pkl: bytes, compress_data: bool = False) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            compress = compress_data and "/data/" in info.filename
            zout.writestr(
                info.filename, data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            )


def test_forbidden_opcodes_and_layouts(tmp_path: Path) -> None:
    from lazymerge.errors import InputError

    torch.save({"w": torch.ones(2)}, tmp_path / "good.bin")
    with zipfile.ZipFile(tmp_path / "good.bin") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    inst = b"(S'touch x'\nios\nsystem\n."  # protocol 0: INST calls os.system
    rewrite_pickle(tmp_path / "good.bin", tmp_path / "inst.bin", inst)
    with pytest.raises(InputError, match=r"inst.bin: refused pickle opcode INST at byte \d+"):
        CheckpointIndex.open(tmp_path / "inst.bin")
    rewrite_pickle(tmp_path / "good.bin", tmp_path / "deflated.bin", pkl, compress_data=True)
    with pytest.raises(InputError, match="is compressed; cannot map it"):
        CheckpointIndex.open(tmp_path / "deflated.bin")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "nested.bin")
    with pytest.raises(InputError, match=r"not a flat state dict of tensors"):
        CheckpointIndex.open(tmp_path / "nested.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=r"not a PyTorch zip checkpoint \(and not safetensors\)"):
        CheckpointIndex.open(tmp_path / "junk.bin")


def test_legacy_format_is_refused_with_a_conversion_recipe(tmp_path: Path) -> None:
    from lazymerge.errors import InputError

    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "pytorch_model.bin").write_bytes(buf.getvalue())
    with pytest.raises(InputError) as e:
        CheckpointIndex.open(tmp_path)
    msg = str(e.value)
    assert "legacy (pre-1.6) torch.save format" in msg and "weights_only=True" in msg
    assert "st.save_file" in msg
