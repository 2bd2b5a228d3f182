"""GGUF input (issue 18): a base or model may be a llama.cpp `.gguf` file, read as the
transformers checkpoint it holds: names, shapes and config from its header, rows
dequantized block by block with the Q/K permutation undone.

Independent references: the original model's own safetensors (a GGUF written longhand
with gguf-py's writer from it reads back to the same values, all four families);
transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`: its names, its
un-permutation, its config) on quantized files; PEFT's merge of a LoRA into the model
transformers dequantized; gguf-py's GGUFReader for the header and gguf-py's quantizer for
what a GGUF output holds. Hostile headers are fuzzed: one InputError, never another
exception.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_gguf_meta import CASES, write_gguf
from test_gguf_meta import make_model as make_family_model
from test_gguf_output import expected_values, llama_name, make_model

from lazymerge.errors import InputError
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.config import checkpoint_config
from lazymerge.read.gguf import read_gguf
from lazymerge.read.mapped import MappedReader
from lazymerge.testing_tokenizer import write_tokenizer

from conftest import error_of, load_merged, make_adapter, run_cli

FUZZ = settings(
    max_examples=int(os.environ.get("LAZYMERGE_FUZZ_EXAMPLES", "150")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def read_all(path: Path, block: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint through lazymerge's reader, in blocks of `block` rows."""
    index = CheckpointIndex.open(path)
    out = {}
    with MappedReader() as reader:
        for name, ref in index.tensors.items():
            step = block or ref.rows
            parts = [reader.rows(ref, r, min(r + step, ref.rows)) for r in range(0, ref.rows, step)]
            out[name] = torch.cat(parts).clone()
    return out


def hf_load(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """transformers' reading of a GGUF: its state dict (fp32) and config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return {k: v.detach() for k, v in model.state_dict().items()}, model.config


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A merged Llama as GGUFs of several types (lazymerge's writer, itself checked
    against llama.cpp in test_gguf_output/test_gguf_quants), its safetensors, a LoRA."""
    root = tmp_path_factory.mktemp("gguf-in")
    make_model(root / "base", seed=1)
    make_model(root / "other", seed=2)
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({"base": "base", "other": "other", "gradient": {"values": [0.3]}}))
    paths = {"lora": make_adapter(root / "other", root / "lora", seed=5)}
    for quant in ("f16", "q8_0", "q4_k_m"):
        out = root / quant
        flags = ("--format", "gguf", "--quant", quant)
        assert run_cli("merge", recipe, "-o", out, "-q", *flags) == 0
        # Alone in a folder (transformers would read tokenizer files beside it).
        alone = root / f"{quant}-alone"
        alone.mkdir()
        shutil.copyfile(out / f"model-{quant}.gguf", alone / "model.gguf")
        paths[quant] = alone / "model.gguf"
    assert run_cli("merge", recipe, "-o", root / "st", "-q") == 0
    paths["st"] = root / "st"
    return paths


@pytest.mark.parametrize("family", sorted(CASES))
def test_each_family_reads_back_to_its_own_weights(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A float32 GGUF written by test_gguf_meta's converter (gguf-py's writer, with
    lazymerge's names and Q/K order, which test_gguf_output checks against gguf-py's map
    and a longhand permutation) is read as that model: its names, shapes and exact
    values, in any blocks; its config as the model's config.json says. (The inverse
    permutation against transformers' own: the next test.)"""
    _, n_tokens, vocab, extra = CASES[family]
    model_dir = tmp_path / "model"
    make_family_model(model_dir, family, vocab, **extra)
    write_tokenizer(model_dir, n_tokens, style=CASES[family][0])
    write_gguf(model_dir, tmp_path / "model.gguf")
    want = load_file(model_dir / "model.safetensors")
    for block in (None, 3, 64):
        got = read_all(tmp_path / "model.gguf", block)
        assert list(got) == [n for n in want if n in got] and set(got) == set(want)
        for name, t in want.items():
            assert torch.equal(got[name], t.float()), name
    config, ours = (
        json.loads((model_dir / "config.json").read_text()),
        checkpoint_config(tmp_path / "model.gguf"),
    )
    assert ours is not None
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):  # fmt: skip
        assert ours[key] == config[key], key
    # llama.cpp's converter writes Mistral as llama: a GGUF says no more
    assert ours["model_type"] == {"mistral": "llama"}.get(family, family)
    assert ours["tie_word_embeddings"] == config.get("tie_word_embeddings", False)
    assert np.float32(ours["rms_norm_eps"]) == np.float32(config["rms_norm_eps"])
    if "head_dim" in extra:
        assert ours["head_dim"] == extra["head_dim"]


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_quantized_tensors_read_as_transformers_loads_them(
    ggufs: dict[str, Path], quant: str
) -> None:
    """Every tensor dequantized and un-permuted as transformers' GGUF loader does it
    (its own name map and permutation; gguf-py's dequantizers), bit for bit; the config
    agrees with transformers' reading of the metadata."""
    theirs, config = hf_load(ggufs[quant])
    ours = read_all(ggufs[quant], block=64)
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name].float(), t), name
    mine = checkpoint_config(ggufs[quant])
    assert mine is not None
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "tie_word_embeddings"):  # fmt: skip
        assert mine[key] == getattr(config, key), key
    assert np.float32(mine["rms_norm_eps"]) == np.float32(config.rms_norm_eps)
    if quant == "f16":  # and f16 is the safetensors merge, exactly
        st = load_merged(ggufs["st"])
        assert all(torch.equal(ours[n], st[n]) for n in st)


def peft_on_gguf(path: Path, lora: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    merged = PeftModel.from_pretrained(model, lora).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def assert_within_ulp(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    for name, t in ref.items():
        got = ours[name]
        assert got.dtype == torch.float32, name  # a quantized base's values are fp32
        tol = 2.0**-22 * float(t.abs().max())  # the LoRA product's summation order
        assert float((got - t).abs().max()) <= tol, name


def test_lora_into_a_q8_0_base_equals_peft_on_the_dequantized_model(
    ggufs: dict[str, Path], tmp_path: Path
) -> None:
    """llama.cpp's export-lora case: a LoRA merged into a quantized base. Written as
    safetensors, it is PEFT's merge into the model transformers dequantized."""
    out = tmp_path / "out"
    assert run_cli("lora", ggufs["q8_0"], ggufs["lora"], "--weight", "1", "-o", out, "-q") == 0
    assert_within_ulp(load_merged(out), peft_on_gguf(ggufs["q8_0"], ggufs["lora"]))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads: config and names complete
    assert run_cli("verify", out) == 0


def gguf_tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_lora_into_a_q8_0_base_written_as_q8_0(ggufs: dict[str, Path], tmp_path: Path) -> None:
    """The same merge written as a q8_0 GGUF: every tensor is gguf-py's Q8_0 of the
    reference values, permuted as llama.cpp's converter permutes them; the tokenizer
    keys are the base's own."""
    out = tmp_path / "out"
    flags = ("--format", "gguf", "--quant", "q8_0")
    assert (
        run_cli("lora", ggufs["q8_0"], ggufs["lora"], "--weight", "1", "-o", out, "-q", *flags) == 0
    )
    ref = expected_values(peft_on_gguf(ggufs["q8_0"], ggufs["lora"]))
    got = gguf_tensors(out / "model-q8_0.gguf")
    assert set(got) == set(ref)
    for name, t in got.items():
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        want = gguf.quants.quantize(ref[name], qtype)
        assert np.array_equal(
            np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)
        ), name
    base, merged = gguf.GGUFReader(ggufs["q8_0"]), gguf.GGUFReader(out / "model-q8_0.gguf")
    keys = [k for k in base.fields if k.startswith("tokenizer.")]
    assert keys and all(base.fields[k].contents() == merged.fields[k].contents() for k in keys)


def test_untouched_tensors_keep_llama_cpps_bytes(ggufs: dict[str, Path], tmp_path: Path) -> None:
    """A q4_k_m base (Q4_K and Q6_K tensors, whose re-quantization is not exact) merged
    with a LoRA on some modules into q4_k_m: every tensor the LoRA leaves alone is the
    base's bytes, as they are."""
    out = tmp_path / "out"
    flags = ("--format", "gguf", "--quant", "q4_k_m")
    assert (
        run_cli("lora", ggufs["q4_k_m"], ggufs["lora"], "--weight", "1", "-o", out, "-q", *flags)
        == 0
    )
    base, merged = gguf_tensors(ggufs["q4_k_m"]), gguf_tensors(out / "model-q4_k_m.gguf")
    adapted = {llama_name(n) for n in peft_on_gguf(ggufs["q4_k_m"], ggufs["lora"])
               if any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}  # fmt: skip
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in base.values()}
    assert {"Q4_K", "Q6_K"} <= types
    same = [n for n in base if n not in adapted]
    assert same and set(merged) == set(base)
    for name in same:
        assert np.array_equal(np.asarray(base[name].data), np.asarray(merged[name].data)), name
    for name in adapted:  # and the adapted ones are changed
        assert not np.array_equal(np.asarray(base[name].data), np.asarray(merged[name].data))


def test_llama3_rope_scaling_comes_back_from_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1's rope scaling, which llama.cpp's converter writes as a rope_freqs
    tensor, is the config's rope_scaling again; a rope_freqs of no known scaling is one
    line."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    model_dir = tmp_path / "model"
    make_family_model(model_dir, "llama", 96, rope_scaling=dict(scaling))  # (it adds to it)
    write_tokenizer(model_dir, 96, style="bpe")
    write_gguf(model_dir, tmp_path / "model.gguf")
    config = checkpoint_config(tmp_path / "model.gguf")
    assert config is not None and config["rope_scaling"] == scaling
    data = bytearray((tmp_path / "model.gguf").read_bytes())
    freqs = next(
        t for t in read_gguf(tmp_path / "model.gguf").tensors if t.name == "rope_freqs.weight"
    )
    data[freqs.offset : freqs.offset + 4] = struct.pack("<f", 3.0)
    (tmp_path / "odd.gguf").write_bytes(bytes(data))
    with pytest.raises(InputError, match="rope_freqs tensor is no Llama 3 rope scaling"):
        checkpoint_config(tmp_path / "odd.gguf")


def test_resume_and_plan_know_a_gguf_input(
    ggufs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ("lora", ggufs["q8_0"], ggufs["lora"], "--weight", "0.5", "-o", out, "-q")
    assert run_cli(*args) == 0
    capsys.readouterr()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"base": {"model": str(ggufs["q8_0"]),
                                           "loras": [{"path": str(ggufs["lora"]), "weight": 0.5}]}}))  # fmt: skip
    assert run_cli("plan", recipe, "--format", "gguf", "--quant", "q4_k_m") == 0
    shown = capsys.readouterr().out
    assert "(gguf)" in shown and "Q6_K" in shown, shown
    assert run_cli(*args, "--resume") == 0
    assert run_cli("inspect", ggufs["q4_k_m"]) == 0
    assert "Q6_K" in capsys.readouterr().out


def hostile(tmp_path: Path, ggufs: dict[str, Path], cut: int) -> Path:
    path = tmp_path / "cut.gguf"
    path.write_bytes(ggufs["q8_0"].read_bytes()[:cut])
    return path


@pytest.mark.parametrize("cut", [0, 10, 24, 300, 5000, -100])
def test_a_truncated_gguf_is_one_line(
    ggufs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int
) -> None:
    size = ggufs["q8_0"].stat().st_size
    path = hostile(tmp_path, ggufs, cut % size if cut < 0 else cut)
    out = tmp_path / "out"
    err = error_of(capsys, "lora", path, ggufs["lora"], "--weight", "1", "-o", out)
    assert str(path) in err
    assert not out.exists()


def write_small(path: Path, arch: str, tensors: dict[str, np.ndarray], **keys: Any) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, value in keys.items():
        w.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_ggufs_lazymerge_cannot_read_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ggufs: dict[str, Path]
) -> None:
    x = np.zeros((8, 32), np.float32)
    gemma = write_small(tmp_path / "gemma.gguf", "gemma", {"token_embd.weight": x})
    no_keys = write_small(tmp_path / "bare.gguf", "llama", {"token_embd.weight": x})
    odd = write_small(tmp_path / "odd.gguf", "llama", {"blk.0.attn_xyz.weight": x},
                      **{"llama.attention.head_count": 4})  # fmt: skip
    for path, says in ((gemma, "GGUF architecture 'gemma'"), (no_keys, "no integer"),
                       (odd, "'blk.0.attn_xyz.weight' has no transformers name")):  # fmt: skip
        out = tmp_path / "out"
        err = error_of(capsys, "lora", path, ggufs["lora"], "--weight", "1", "-o", out)
        assert says in err, err
        assert not out.exists()


def test_a_gguf_base_without_tokenizer_keys(ggufs: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """GGUF output from a GGUF base takes the base's tokenizer keys; a base without any
    is refused unless --no-tokenizer says so."""
    g = read_gguf(ggufs["f16"])
    bare = tmp_path / "bare" / "model.gguf"
    bare.parent.mkdir()
    w = gguf.GGUFWriter(bare, "llama")
    for key, field in g.fields.items():
        if not key.startswith(("tokenizer.", "general.architecture")):
            item = gguf.GGUFValueType(field.item_type) if field.item_type is not None else None
            w.add_key_value(key, field.value, gguf.GGUFValueType(field.vtype), sub_type=item)
    raw = ggufs["f16"].read_bytes()
    for t in g.tensors:  # F16 and F32 only, as numpy arrays
        dtype = {0: np.float32, 1: np.float16}[t.qtype]
        w.add_tensor(
            t.name,
            np.frombuffer(raw, dtype, t.nbytes // np.dtype(dtype).itemsize, t.offset).reshape(
                t.shape
            ),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    args = (
        "lora",
        bare,
        ggufs["lora"],
        "--weight",
        "1",
        "-o",
        out,
        "--format",
        "gguf",
        "--quant",
        "q8_0",
    )
    assert "no tokenizer.ggml.tokens" in error_of(capsys, *args)
    assert not out.exists()
    assert run_cli(*args, "-q", "--no-tokenizer") == 0


def gguf_reference(path: Path) -> dict[str, tuple[int, tuple[int, ...], int]] | None:
    """gguf-py's reading of a file: tensor name -> (type, dims, absolute offset)."""
    try:
        reader = gguf.GGUFReader(path)
        return {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset))
                for t in reader.tensors}  # fmt: skip
    except Exception:  # the reference may fail in any way on garbage
        return None


def parse(data: bytes) -> tuple[Any, dict[str, Any] | None]:
    """(our parse or None if refused with InputError, gguf-py's), of the same bytes."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.gguf"
        path.write_bytes(data)
        try:
            ours = read_gguf(path)
        except InputError:
            return None, None
        for t in ours.tensors:
            assert t.offset >= 0 and t.offset + t.nbytes <= len(data), t
        return ours, gguf_reference(path)


@pytest.fixture(scope="module")
def small_gguf(ggufs: dict[str, Path]) -> bytes:
    """A real GGUF's header and a little data: keys of every kind, arrays, 21 tensors."""
    return ggufs["q8_0"].read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=8),
       keep=st.integers(0, 2**21))  # fmt: skip
def test_fuzzed_gguf_headers(small_gguf: bytes, flips: list[tuple[int, int]], keep: int) -> None:
    """Bytes of a real GGUF changed and cut anywhere: parsed to tensors inside the file
    (the same ones gguf-py reads, where it reads the file at all), or one InputError."""
    data = bytearray(small_gguf[: max(keep, 0)])
    header = read_gguf_len(small_gguf)
    for at, value in flips:
        if data:
            data[at % min(len(data), header)] = value
    ours, theirs = parse(bytes(data))
    if ours is not None and theirs is not None:
        assert {t.name: (t.qtype, t.dims, t.offset) for t in ours.tensors} == theirs


def read_gguf_len(data: bytes) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.gguf"
        path.write_bytes(data)
        return read_gguf(path).data_start


@FUZZ
@given(counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
       body=st.binary(max_size=300))  # fmt: skip
def test_hostile_counts_and_lengths(counts: tuple[int, int], body: bytes) -> None:
    """Any declared counts with any bytes after them: refused or parsed, fast, without
    allocating what the counts claim."""
    data = b"GGUF" + struct.pack("<IQQ", 3, *counts) + body
    parse(data)


def test_valid_ggufs_parse_as_gguf_py_reads_them(ggufs: dict[str, Path]) -> None:
    for quant in ("f16", "q8_0", "q4_k_m"):
        ours, theirs = parse(ggufs[quant].read_bytes())
        assert ours is not None and theirs is not None
        assert {t.name: (t.qtype, t.dims, t.offset) for t in ours.tensors} == theirs
        reader = gguf.GGUFReader(ggufs[quant])
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                want = field.contents()
                assert ours.get(key) == want or np.allclose(ours.get(key), want), key


def test_a_split_gguf_base_is_read_whole(ggufs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A split GGUF (gguf-split's files) named by its first file: every file's tensors,
    the same values as the one file; a later split named, or one missing, is one line."""
    split = tmp_path / "split"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"base": {"model": str(ggufs["q8_0"]), "loras": [
        {"path": str(ggufs["lora"]), "weight": 1.0}]}}))  # fmt: skip
    flags = ("--format", "gguf", "--quant", "q8_0", "--shard-size", "400KB")
    assert run_cli("merge", recipe, "-o", split, "-q", *flags) == 0
    files = sorted(split.glob("*.gguf"))
    assert len(files) > 2
    assert run_cli("merge", recipe, "-o", tmp_path / "one", "-q", *flags[:4]) == 0
    whole = read_all(tmp_path / "one" / "model-q8_0.gguf")
    parts = read_all(files[0])
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[n], whole[n]) for n in whole)
    assert checkpoint_config(files[0]) == checkpoint_config(tmp_path / "one" / "model-q8_0.gguf")
    out = tmp_path / "out"
    assert "name the first file" in error_of(capsys, "lora", files[1], ggufs["lora"], "--weight", "1", "-o", out)  # fmt: skip
    files[-1].unlink()
    assert f"split file {files[-1].name} is missing" in error_of(capsys, "lora", files[0], ggufs["lora"], "--weight", "1", "-o", out)  # fmt: skip
    assert not out.exists()
