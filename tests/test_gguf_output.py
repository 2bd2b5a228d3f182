"""GGUF output (issue 18): `--format gguf --quant Q` writes one llama.cpp file in the
merge's pass. Checked against independent references: gguf-py reads it back (names,
types, metadata, tokenizer keys); every tensor's bytes equal gguf-py's own quantizer
applied to our safetensors output, Q and K rows permuted longhand as llama.cpp's
converter does (the k-quants, which gguf-py cannot quantize, against llama.cpp's C
bytes in tests/test_gguf_quants.py, and here dequantized within their error);
transformers loads the f16 and q8_0 files with the safetensors output's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import error_of, load_merged, run_cli

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 4, 2, 2, 320
PLAIN = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
KQUANTS = ("q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
# llama.cpp's names for a Llama's tensors (gguf-py's tensor_mapping, written out here).
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def llama_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, _, param = rest.rpartition(".")
    return f"blk.{layer}.{LLAMA_NAMES[module]}.{param}"


def make_model(directory: Path, seed: int) -> Path:
    """A random fp16 Llama whose rows are k-quant sized (256), with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lazymerge.testing_tokenizer import write_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.to(torch.float16).save_pretrained(directory)
    write_tokenizer(directory, VOCAB, seed=seed)
    return directory


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    make_model(root / "base", seed=1)
    make_model(root / "other", seed=2)
    path = root / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({"base": "base", "other": "other", "gradient": {"values": [0.2, 0.8]}})
    )
    return path


@pytest.fixture(scope="module")
def safetensors_out(recipe: Path) -> dict[str, torch.Tensor]:
    out = recipe.parent / "st"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    return load_merged(out)


def merge_gguf(recipe: Path, quant: str, *flags: str) -> Path:
    out = recipe.parent / f"gguf-{quant}{''.join(flags)}"
    if not out.exists():
        assert (
            run_cli("merge", recipe, "-o", out, "-q", "--format", "gguf", "--quant", quant, *flags)
            == 0
        )
    return out / f"model-{quant}.gguf"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (LlamaModel.permute), longhand."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def expected_values(st: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The safetensors output's values as llama.cpp's converter would lay them out."""
    values = {}
    for name, t in st.items():
        w = t.float().numpy()
        if "q_proj" in name:
            w = permute(w, HEADS)
        elif "k_proj" in name:
            w = permute(w, KV_HEADS)
        values[llama_name(name)] = w
    return values


def read_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("quant", PLAIN + KQUANTS)
def test_every_tensor_is_llama_cpps_encoding_of_the_merge(
    recipe: Path, safetensors_out: dict[str, torch.Tensor], quant: str
) -> None:
    from gguf import GGMLQuantizationType, quants

    _, tensors = read_gguf(merge_gguf(recipe, quant))
    values = expected_values(safetensors_out)
    assert set(tensors) == set(values)
    kinds = set()
    for name, w in values.items():
        t = tensors[name]
        qtype = GGMLQuantizationType(t.tensor_type)
        kinds.add(qtype.name)
        assert list(reversed([int(n) for n in t.shape])) == list(w.shape), name
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        if w.ndim == 1:
            assert qtype == GGMLQuantizationType.F32, name  # norms stay F32, as in llama.cpp
        if qtype.name.endswith("_K"):  # gguf-py only dequantizes these: within their error
            back = quants.dequantize(raw.reshape(w.shape[0], -1), qtype).reshape(w.shape)
            assert np.abs(back - w).max() <= 0.25 * np.abs(w).max(), name
            continue
        want = quants.quantize(w.reshape(w.shape[0], -1), qtype).view(np.uint8).reshape(-1)
        assert np.array_equal(raw, want), f"{quant} {name} ({qtype.name})"
    if quant in ("f16", "f32", "bf16"):
        assert kinds <= {quant.upper(), "F32"}
    else:
        assert any(k.startswith(quant[:2].upper()) for k in kinds), kinds


def test_f16_dequantizes_to_the_safetensors_output_exactly(
    recipe: Path, safetensors_out: dict[str, torch.Tensor]
) -> None:
    from gguf import quants

    _, tensors = read_gguf(merge_gguf(recipe, "f16"))
    for name, w in expected_values(safetensors_out).items():
        t = tensors[name]
        back = quants.dequantize(
            np.asarray(t.data).view(np.uint8).reshape(w.shape[0], -1), t.tensor_type
        )
        assert np.array_equal(back.reshape(w.shape), w), name


def test_metadata_and_tokenizer_keys(recipe: Path) -> None:
    reader, _ = read_gguf(merge_gguf(recipe, "q8_0"))
    fields = reader.fields

    def value(key: str) -> Any:
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert value("general.architecture") == "llama"
    assert int(value("llama.block_count")) == LAYERS
    assert int(value("llama.embedding_length")) == HIDDEN
    assert int(value("llama.attention.head_count")) == HEADS
    assert int(value("llama.attention.head_count_kv")) == KV_HEADS
    assert int(value("general.file_type")) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert len(value("tokenizer.ggml.tokens")) == VOCAB
    assert "tokenizer.ggml.model" in fields and "tokenizer.ggml.bos_token_id" in fields


@pytest.mark.parametrize(("quant", "tolerance"), [("f16", 1e-3), ("q8_0", 0.1)])
def test_transformers_loads_it_with_the_safetensors_logits(
    recipe: Path, quant: str, tolerance: float
) -> None:
    from transformers import AutoModelForCausalLM

    path = merge_gguf(recipe, quant)
    ours = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ref = AutoModelForCausalLM.from_pretrained(recipe.parent / "st", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 257]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert (a - b).abs().max() <= tolerance * b.abs().max(), (a - b).abs().max()


def test_plan_shows_types_and_the_file_size(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lazymerge.views.report import human_bytes

    path = merge_gguf(recipe, "q4_k_m")
    capsys.readouterr()
    assert run_cli("plan", recipe, "--format", "gguf", "--quant", "q4_k_m") == 0
    text = capsys.readouterr().out
    assert "GGUF q4_k_m: " in text and "Q6_K" in text and "F32" in text
    assert f"model-q4_k_m.gguf  {human_bytes(path.stat().st_size)}  " in text, text


def test_verify_and_resume_know_a_gguf_merge(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = merge_gguf(recipe, "q8_0")
    assert run_cli("verify", path.parent) == 0
    manifest = json.loads((path.parent / "lazymerge.json").read_text())
    assert manifest["status"] == "complete"
    assert (
        run_cli(
            "merge",
            recipe,
            "-o",
            path.parent,
            "-q",
            "--format",
            "gguf",
            "--quant",
            "q8_0",
            "--resume",
        )
        == 0
    )
    assert not (path.parent / "model.safetensors.index.json").exists()
    assert not (path.parent / "config.json").exists()


def test_recipe_output_block_asks_for_gguf(recipe: Path) -> None:
    data = yaml.safe_load(recipe.read_text()) | {"output": {"format": "gguf", "quant": "q5_1"}}
    native = recipe.parent / "native.yaml"
    native.write_text(yaml.safe_dump(data))
    out = recipe.parent / "native-out"
    assert run_cli("merge", native, "-o", out, "-q") == 0
    via_flags = merge_gguf(recipe, "q5_1")
    assert (out / "model-q5_1.gguf").read_bytes()[-4096:] == via_flags.read_bytes()[-4096:]


def test_no_tokenizer_flag_and_its_refusal(
    recipe: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (recipe.parent / "base").iterdir():
        if "token" not in f.name:
            (bare / f.name).symlink_to(f)
    cfg = tmp_path / "bare.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(bare), "other": str(recipe.parent / "other"),
                                   "gradient": {"values": [0.5]}}))  # fmt: skip
    err = error_of(
        capsys, "merge", cfg, "-o", tmp_path / "out", "--format", "gguf", "--quant", "q8_0"
    )
    assert "tokenizer" in err and "--no-tokenizer" in err
    assert not (tmp_path / "out").exists()
    assert (
        run_cli(
            "merge",
            cfg,
            "-o",
            tmp_path / "out2",
            "-q",
            "--format",
            "gguf",
            "--quant",
            "q8_0",
            "--no-tokenizer",
        )
        == 0
    )
    reader, _ = read_gguf(tmp_path / "out2" / "model-q8_0.gguf")
    assert "tokenizer.ggml.tokens" not in reader.fields


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--format", "gguf", "--quant", "q3_k"], "quant 'q3_k' does not exist"),
        (["--format", "gguf"], "format gguf needs a quant"),
        (["--quant", "q8_0"], "quant and tokenizer are for format: gguf"),
    ],
)
def test_bad_gguf_flags_are_one_line(
    recipe: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flags: list[str],
    expected: str,
) -> None:
    assert expected in error_of(capsys, "merge", recipe, "-o", tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_an_architecture_llama_cpp_cannot_take_is_one_line(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in models["base"].iterdir():
        if f.name != "config.json":
            (odd / f.name).symlink_to(f)
    config = json.loads((models["base"] / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"model_type": "falcon_mamba_x"}))
    cfg = tmp_path / "odd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"base": str(odd), "other": str(models["other"]), "gradient": {"values": [0.5]}}
        )
    )
    err = error_of(
        capsys, "merge", cfg, "-o", tmp_path / "out", "--format", "gguf", "--quant", "f16"
    )
    assert "falcon_mamba_x" in err
    assert not (tmp_path / "out").exists()


def test_llama31_rope_scaling_is_written_as_rope_freqs(recipe: Path, tmp_path: Path) -> None:
    """Llama 3.1's rope scaling: llama.cpp reads it from a rope_freqs.weight tensor its
    converter computes from config.json (meaning.gguf.rope_freqs, checked against
    transformers' own rope in test_gguf_meta.py); the GGUF holds it, F32, exactly."""
    import gguf
    from gguf import GGMLQuantizationType

    from lazymerge.meaning.gguf import rope_freqs

    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for f in (recipe.parent / "base").iterdir():
        if f.name != "config.json":
            (scaled / f.name).symlink_to(f)
    config = json.loads((recipe.parent / "base" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    config.pop("rope_parameters", None)
    (scaled / "config.json").write_text(json.dumps(config))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(scaled), "other": str(recipe.parent / "other"),
                                   "gradient": {"values": [0.5]}}))  # fmt: skip
    out = tmp_path / "out"
    assert run_cli("merge", cfg, "-o", out, "-q", "--format", "gguf", "--quant", "f16") == 0
    _, tensors = read_gguf(out / "model-f16.gguf")
    t = tensors["rope_freqs.weight"]
    assert GGMLQuantizationType(t.tensor_type) == GGMLQuantizationType.F32
    want = rope_freqs(gguf.MODEL_ARCH.LLAMA, config)
    assert want is not None and np.array_equal(np.asarray(t.data), want)
    # independently: transformers' own llama3 frequencies, as divisors of the plain ones
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    dim = HIDDEN // HEADS
    theta = hf.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    np.testing.assert_allclose(np.asarray(t.data), (plain / scaled).numpy(), rtol=1e-6)
    assert run_cli("verify", out) == 0


def test_inspect_reads_a_gguf(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = merge_gguf(recipe, "q4_k_m")
    capsys.readouterr()
    assert run_cli("inspect", path.parent, "--all") == 0
    text = capsys.readouterr().out
    assert text.startswith(f"gguf: {path} (")
    assert f"architecture: llama; decoder layers: {LAYERS}; tokenizer: yes" in text
    assert "blk.1.attn_v.weight" in text and "Q6_K" in text and "token_embd.weight" in text
    _, tensors = read_gguf(path)
    assert f"tensors: {len(tensors)} (" in text


def test_the_bytes_do_not_depend_on_the_memory_budget(recipe: Path) -> None:
    """Blocks of any size, encoded in the lane beside the next block: the same file."""
    path = merge_gguf(recipe, "q4_k_m")
    out = recipe.parent / "narrow"
    flags = ["--format", "gguf", "--quant", "q4_k_m", "--max-memory", "1KiB"]
    assert run_cli("merge", recipe, "-o", out, "-q", *flags) == 0
    (_, wide), (_, narrow) = read_gguf(path), read_gguf(out / "model-q4_k_m.gguf")
    assert wide.keys() == narrow.keys()
    for name, t in wide.items():  # the header differs only in general.name (the directory)
        assert np.asarray(t.data).tobytes() == np.asarray(narrow[name].data).tobytes(), name


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_loads_it_with_the_transformers_logits(
    recipe: Path, safetensors_out: dict[str, torch.Tensor], quant: str
) -> None:
    """Optional (runs where llama-cpp-python imports): llama.cpp itself loads our GGUF,
    tokenizes as transformers does, and its logits agree with transformers' on the
    safetensors output (f16: fp16 arithmetic apart; q8_0: within quantization)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = merge_gguf(recipe, quant)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False
    )
    text = "hello world"
    hf = AutoTokenizer.from_pretrained(recipe.parent / "st")
    assert (
        llm.tokenize(text.encode(), add_bos=False)
        == hf(text, add_special_tokens=False)["input_ids"]
    )
    ids = [1, 5, 9, 17, 33, 65, 129, 257]
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    ref = AutoModelForCausalLM.from_pretrained(recipe.parent / "st", dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    tolerance = 0.005 if quant == "f16" else 0.05  # measured: 0.0004, 0.019 of the max
    assert np.abs(ours - want).max() <= tolerance * np.abs(want).max()


def test_split_files_as_gguf_split_names_and_cuts_them(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--shard-size` on a GGUF asks for split files: named as llama.cpp's gguf-split
    names them, cut where gguf-py's writer cuts (a new file when the next tensor would
    take this one's data past the size), the metadata in the first, split.no/count/
    tensors.count in each; together the one-file GGUF's tensors, byte for byte."""
    whole = merge_gguf(recipe, "q8_0")
    out = recipe.parent / "split"
    flags = ["--format", "gguf", "--quant", "q8_0", "--shard-size", "500KB"]
    assert run_cli("plan", recipe, *flags) == 0
    assert "model-q8_0-00001-of-00004.gguf" in capsys.readouterr().out
    assert run_cli("merge", recipe, "-o", out, "-q", *flags) == 0
    files = sorted(out.glob("*.gguf"))
    assert [f.name for f in files] == [f"model-q8_0-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    one, _ = read_gguf(whole)
    got: dict[str, bytes] = {}
    sizes = []
    for i, f in enumerate(files):
        reader, tensors = read_gguf(f)
        keys = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
        assert keys["split.no"] == i and keys["split.count"] == 4
        assert keys["split.tensors.count"] == len(one.tensors)
        if i == 0:  # the metadata, as the one file's (general.name: the directory)
            want = {k: v.contents() for k, v in one.fields.items() if not k.startswith("GGUF.")}
            assert {
                k: v for k, v in keys.items() if not k.startswith(("split.", "general.name"))
            } == {k: v for k, v in want.items() if k != "general.name"}
        else:
            assert set(keys) == {"split.no", "split.count", "split.tensors.count"}
        got |= {n: np.asarray(t.data).tobytes() for n, t in tensors.items()}
        sizes.append(sum(int(t.n_bytes) for t in tensors.values()))
    assert got == {t.name: np.asarray(t.data).tobytes() for t in one.tensors}
    limit = 500_000  # each file's data within the size, but for a file of one tensor
    assert all(size <= limit for size in sizes)
    assert run_cli("verify", out) == 0
    assert "4 GGUF split files" in capsys.readouterr().out
    assert run_cli("merge", recipe, "-o", out, "-q", "--resume", *flags) == 0


def test_llama_cpp_loads_split_files_as_the_one_file(recipe: Path) -> None:
    """Optional (llama-cpp-python): llama.cpp loads the first split and finds the rest
    by name; the same logits as the one-file GGUF."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = recipe.parent / "split-llama"
    flags = ["--format", "gguf", "--quant", "q8_0", "--shard-size", "600KB"]
    assert run_cli("merge", recipe, "-o", out, "-q", *flags) == 0
    ids = [1, 5, 9, 17, 33]
    scores = []
    for path in (merge_gguf(recipe, "q8_0"), sorted(out.glob("*.gguf"))[0]):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
        llm.eval(ids)
        scores.append(np.array(llm.scores[: len(ids)]))
    assert len(list(out.glob("*.gguf"))) > 1
    assert np.array_equal(scores[0], scores[1])
