"""PyTorch .bin checkpoints: read lazily, never by running their pickle."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import shutil
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.mapped import MappedReader

from conftest import error_of, load_merged, run_cli

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


# Ambiguous .bin files: each is refused; what torch.load does with it is checked alongside.


class DupState:
    """Pickles as an OrderedDict filled from `pairs`, as they are: a key may come twice."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        self.pairs = pairs

    def __reduce__(self) -> tuple[object, ...]:
        return collections.OrderedDict, (), None, None, iter(self.pairs)


def two_tensors() -> dict[str, torch.Tensor]:
    return {"first": torch.tensor([1.0, 2.0, 3.0, 4.0]), "secnd": torch.tensor([5.0, 6.0]).half()}


def zip_entries(path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """The archive's folder prefix ("archive/") and its entries, in order."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    return entries[0][0].split("/")[0] + "/", entries


def write_zip(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with warnings.catch_warnings():  # zipfile warns of a duplicate name, and writes it
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w") as z:
            for name, data in entries:
                z.writestr(name, data)


def key_twice(path: Path) -> None:
    torch.save(DupState([*two_tensors().items(), ("first", torch.zeros(4))]), path)


def storage_twice(path: Path) -> None:
    """secnd's storage record names storage 0 (first's, F32) as an F16 storage."""
    torch.save(two_tensors(), path)
    prefix, entries = zip_entries(path)
    key = b"X\x01\x00\x00\x00"  # BINUNICODE of a one-character string: the storage key
    pkl = {n: d for n, d in entries}[prefix + "data.pkl"]
    assert pkl.count(key + b"1") == 1
    write_zip(
        path, [(n, pkl.replace(key + b"1", key + b"0") if d is pkl else d) for n, d in entries]
    )


def record_too_long(path: Path) -> None:
    torch.save(two_tensors(), path)
    prefix, entries = zip_entries(path)
    write_zip(path, [(n, d + b"\0" * 4 if n == prefix + "data/0" else d) for n, d in entries])


def entry_twice(path: Path) -> None:
    torch.save(two_tensors(), path)
    prefix, entries = zip_entries(path)
    write_zip(path, [*entries, (prefix + "data/0", struct.pack("<4f", 9, 9, 9, 9))])


def central_entry(raw: bytes, name: bytes) -> int:
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46 : at + 46 + len(name)] != name:
        at = raw.find(b"PK\x01\x02", at + 1)
    return at


def local_name_differs(path: Path) -> None:
    torch.save(two_tensors(), path)
    prefix, _ = zip_entries(path)
    raw = bytearray(path.read_bytes())
    name = f"{prefix}data/1".encode()
    (at,) = struct.unpack("<L", raw[central_entry(raw, name) + 42 :][:4])
    raw[at + 30 : at + 30 + len(name)] = name[:-1] + b"7"
    path.write_bytes(bytes(raw))


def storages_overlap(path: Path) -> None:
    """Record data/1's local header, then its bytes, hidden inside record data/0 (a uint8
    tensor), and the central directory pointed there: two storages over the same bytes."""
    secnd = torch.tensor([5.0, 6.0]).half()
    torch.save({"x": secnd}, path)
    prefix, _ = zip_entries(path)
    name, data = f"{prefix}data/1".encode(), secnd.numpy().tobytes()
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data),
        len(name), 0,
    ) + name + data  # fmt: skip
    blob = torch.frombuffer(bytearray(bytes(8) + local), dtype=torch.uint8)
    torch.save({"blob": blob, "secnd": secnd}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        at = z.getinfo(f"{prefix}data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", raw[at + 26 : at + 30])
    hidden = at + 30 + name_len + extra_len + 8
    entry = central_entry(raw, name)
    raw[entry + 42 : entry + 46] = struct.pack("<L", hidden)
    path.write_bytes(bytes(raw))


RESAVE = "re-save it from the model (save_pretrained, or torch.save of its state_dict)"
# Each file: what we say, and what torch.load(weights_only=True) reads from it.
AMBIGUOUS_BINS = {
    "a key twice": (
        key_twice,
        "key 'first' is set twice in one dict (torch.load keeps the last)",
        {"first": [0.0] * 4, "secnd": [5.0, 6.0]},
    ),
    "a storage declared twice": (
        storage_twice,
        "storage 0 is declared as F32 x 4 and as F16 x 2",
        {"first": [1.0, 2.0, 3.0, 4.0], "secnd": [1.0, 2.0]},  # secnd read as F32!
    ),
    "a record longer than its storage": (
        record_too_long,
        "tensor 'first' uses storage 0 of 4 F32 (16 bytes) but its record has 20 bytes",
        "record size (20 bytes) does not match expected size",
    ),
    "a zip entry twice": (
        entry_twice,
        "data/0 appears twice",
        {"first": [9.0] * 4, "secnd": [5.0, 6.0]},  # the last one
    ),
    "a record whose local header names another": (
        local_name_differs,
        "data/1's local header names another file",
        {"first": [1.0, 2.0, 3.0, 4.0], "secnd": [5.0, 6.0]},  # (zipfile refuses to open it)
    ),
    "two storages over the same bytes": (
        storages_overlap,
        "storages 0 and 1 (of tensors 'blob' and 'secnd') overlap in the archive",
        {"secnd": [5.0, 6.0]},  # and blob, whose bytes hold secnd's record
    ),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS_BINS))
def test_ambiguous_bin_is_refused(case: str, tmp_path: Path) -> None:
    from lazymerge.errors import InputError

    make, message, torch_reads = AMBIGUOUS_BINS[case]
    path = tmp_path / "model.bin"
    make(path)
    with pytest.raises(InputError) as e:
        CheckpointIndex.open(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert str(e.value).endswith(f"; {RESAVE}") and "\n" not in str(e.value)
    if isinstance(torch_reads, str):
        with pytest.raises(RuntimeError, match=re.escape(torch_reads)):
            torch.load(path, weights_only=True)
    else:
        state = torch.load(path, weights_only=True)
        for name, values in torch_reads.items():
            assert state[name].tolist() == values, name


def test_tied_and_overlapping_views_of_one_storage_are_fine(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    state = {"embed": base, "head": base, "top": base[:4], "bottom": base[2:], "t": base.t()}
    torch.save(state, tmp_path / "model.bin")
    index = CheckpointIndex.open(tmp_path / "model.bin")
    expected = torch.load(tmp_path / "model.bin", weights_only=True)
    with MappedReader() as reader:
        for name, want in expected.items():
            assert torch.equal(reader.rows(index[name], 0, index[name].rows), want), name


@pytest.fixture(scope="module")
def ambiguous_dirs(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Each ambiguous file as a model directory's pytorch_model.bin, beside a real config."""
    root = tmp_path_factory.mktemp("ambiguous")
    dirs = {}
    for case, (make, _, _) in AMBIGUOUS_BINS.items():
        d = root / case.replace(" ", "-")
        d.mkdir()
        shutil.copy(models["base"] / "config.json", d)
        make(d / "pytorch_model.bin")
        dirs[case] = d
    return dirs


@pytest.mark.parametrize("case", list(AMBIGUOUS_BINS))
def test_ambiguous_bin_through_the_cli(
    case: str,
    ambiguous_dirs: dict[str, Path],
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from test_hostile import refused

    bad, message = ambiguous_dirs[case], AMBIGUOUS_BINS[case][1]
    refused(capsys, ["inspect", bad], [bad], None, message)
    out = tmp_path / "out"
    args = ["gradient", bad, models["other"], "--values", "0.5", "-o", out, "-q"]
    refused(capsys, args, [bad, models["other"]], out, message)
    assert not out.exists()
