"""write/quants.py against independent references: llama.cpp's own C quantizers (bytes
committed in tests/fixtures/gguf/quants.safetensors by make_quant_fixtures.py, so no
compiler is needed here), gguf-py's dequantizers, and llama.cpp's per-tensor type rules
(src/llama-quant.cpp, convert_hf_to_gguf.py) written out longhand for a Llama-7B.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from safetensors.numpy import load_file

from lazymerge.meaning.gguf_types import MIXES, QUANTS, ModelFacts, row_bytes, tensor_type
from lazymerge.write import quants
from lazymerge.write.quants import encode

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"
REFERENCE = load_file(str(FIXTURES / "quants.safetensors"))
INPUTS = ("weights", "narrow", "edges")
ENCODED = [q for q in QUANTS if q != "f32"]  # f32's bytes are the input's


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("quant", ENCODED)
def test_encode_is_llama_cpp_bytes(quant: str, name: str) -> None:
    rows = REFERENCE[f"input.{name}"]
    got = encode(rows, QUANTS[quant])
    want = REFERENCE[f"{quant}.{name}"]
    assert got.dtype == np.uint8 and got.shape == want.shape
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, f"{quant} differs from llama.cpp in rows {bad.tolist()} of {name}"


@pytest.mark.parametrize("quant", ["q4_k", "q5_k", "q6_k"])
def test_kquants_are_the_same_in_any_chunking(quant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Super-blocks are independent: 3 a pass (chunks with and without the odd ones)
    give the bytes of one pass."""
    monkeypatch.setattr(quants, "_CHUNK", 3)
    rows = REFERENCE["input.edges"]
    assert np.array_equal(encode(rows, QUANTS[quant]), REFERENCE[f"{quant}.edges"])


def test_q8_0_is_the_same_in_any_chunking_and_on_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """lazymerge's own Q8_0 (blocks as columns): chunks of 3 blocks give the bytes of
    one pass, and values that land on .5 after scaling round away from zero, as roundf
    (and gguf-py's np_roundf) do, not to even."""
    rows = REFERENCE["input.edges"]
    whole = encode(rows, T.Q8_0)
    monkeypatch.setattr(quants, "_Q8_CHUNK", 3)
    assert np.array_equal(encode(rows, T.Q8_0), whole)
    ties = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, *range(25)]], np.float32)
    data = encode(ties, T.Q8_0)  # d = 127 / 127 = 1: the values are their own levels
    assert data[0, 2:9].view(np.int8).tolist() == [127, 1, 2, 3, -1, -2, -3]
    assert np.array_equal(data, np.asarray(gguf_quants.quantize(ties, T.Q8_0)).view(np.uint8))


def test_f32_is_the_input_bytes() -> None:
    rows = REFERENCE["input.narrow"]
    assert encode(rows, T.F32).tobytes() == rows.astype("<f4").tobytes()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_gguf_py_differs_from_llama_cpp_only_in_zero_signs(quant: str) -> None:
    """Why encode corrects gguf-py: for a block of zeros its q4_0/q5_0 d, and its
    q4_1/q5_1 d and m, can be the other signed zero than the C's (bytes 0x00 vs 0x80
    of the fp16's high byte). Everything else is equal."""
    for name in INPUTS:
        rows = REFERENCE[f"input.{name}"]
        with np.errstate(all="ignore"):
            theirs = np.asarray(gguf_quants.quantize(rows, QUANTS[quant])).view(np.uint8)
        want = REFERENCE[f"{quant}.{name}"]
        block = {"q4_0": 18, "q5_0": 22, "q4_1": 20, "q5_1": 24}.get(quant)
        diff = theirs.reshape(rows.shape[0], -1) != want
        if block is None:
            assert not diff.any()
            continue
        where = np.nonzero(diff.reshape(-1, block))
        assert set(where[1]) <= {1, 3}  # the high bytes of d and m
        assert set(want.reshape(-1, block)[where]) | set(theirs.reshape(-1, block)[where]) <= {
            0x00,
            0x80,
        }


@pytest.mark.parametrize(("quant", "rms"), [("q4_k", 0.09), ("q5_k", 0.045), ("q6_k", 0.022)])
def test_kquants_dequantize_back_with_gguf_py(quant: str, rms: float) -> None:
    """gguf-py's dequantizer reads our k-quant bytes back within each type's error:
    a small RMS error relative to the values' RMS, and no value further off than a
    quantization step of its super-block."""
    x = REFERENCE["input.weights"]
    back = gguf_quants.dequantize(encode(x, QUANTS[quant]), QUANTS[quant])
    assert back.shape == x.shape
    err = back - x
    assert np.sqrt(np.mean(err**2)) < rms * np.sqrt(np.mean(x**2))
    blocks = x.reshape(-1, 256)
    step = (blocks.max(axis=1) - np.minimum(blocks.min(axis=1), 0)) / {"q4_k": 15, "q5_k": 31}.get(
        quant, 32
    )
    assert (np.abs(err.reshape(-1, 256)) <= step[:, None]).all()


def test_sums_run_in_the_cs_order() -> None:
    """_seqsum adds down axis 0 one row at a time, as `s += a[i]` in float32 does --
    a pairwise or float64 sum gives other bits for these values."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 64)) * 10.0 ** rng.integers(-4, 5, (32, 64))).astype(np.float32)
    want = np.zeros(64, np.float32)
    for row in a:
        want = want + row
    assert np.array_equal(quants._seqsum(a), want)
    pairwise = np.ascontiguousarray(a.T).sum(axis=1)  # numpy along a contiguous axis
    assert not np.array_equal(pairwise, want)
    assert not np.array_equal(a.astype(np.float64).sum(axis=0).astype(np.float32), want)


def test_fixture_inputs_are_the_scripts() -> None:
    """The committed inputs are what make_quant_fixtures.py draws (its seeds and edge
    cases), so regenerating the fixture only changes bytes if llama.cpp's do."""
    spec = importlib.util.spec_from_file_location("mqf", FIXTURES / "make_quant_fixtures.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, rows in script.inputs().items():
        assert np.array_equal(rows, REFERENCE[f"input.{name}"], equal_nan=True), name
    assert (FIXTURES / "quants.safetensors").stat().st_size < 1_500_000


def test_row_bytes() -> None:
    assert row_bytes(4096, T.F32) == 16384
    assert row_bytes(4096, T.BF16) == 8192
    assert row_bytes(4096, T.Q8_0) == 128 * 34
    assert row_bytes(4096, T.Q4_0) == 128 * 18
    assert row_bytes(4096, int(T.Q4_K)) == 16 * 144
    assert row_bytes(4096, T.Q5_K) == 16 * 176
    assert row_bytes(11008, T.Q6_K) == 43 * 210
    with pytest.raises(ValueError, match="a row of 896 is not whole Q4_K blocks of 256"):
        row_bytes(896, T.Q4_K)


def test_encode_bad_input() -> None:
    rows = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="no encoder for Q2_K; known: f32, f16, bf16, q8_0"):
        encode(rows, T.Q2_K)
    with pytest.raises(ValueError, match="a row of 100 is not whole Q8_0 blocks of 32"):
        encode(np.zeros((2, 100), np.float32), T.Q8_0)
    for qtype in (T.F32, T.Q4_0, T.Q4_K):
        assert encode(np.zeros((0, 512), np.float32), qtype).shape == (0, row_bytes(512, qtype))


# ---- tensor_type: llama.cpp's per-tensor choices ------------------------------------------

LAYERS = 32
# Llama-7B (HF order: rows first): hidden 4096, ffn 11008 (43 super-blocks), vocab 32000.
SHAPES = {
    "attn_q": (4096, 4096),
    "attn_k": (4096, 4096),
    "attn_v": (4096, 4096),
    "attn_output": (4096, 4096),
    "ffn_gate": (11008, 4096),
    "ffn_up": (11008, 4096),
    "ffn_down": (4096, 11008),
    "attn_norm": (4096,),
    "ffn_norm": (4096,),
}

# use_more_bits(i, 32) = i < 32/8 || i >= 7*32/8 || (i - 32/8) % 3 == 2: the first 4,
# the last 4, and from layer 4 every third one starting at 6.
MORE_BITS = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def llama_7b() -> list[tuple[str, tuple[int, ...]]]:
    names = [("token_embd.weight", (32000, 4096)), ("output_norm.weight", (4096,))]
    names.append(("output.weight", (32000, 4096)))
    for i in range(LAYERS):
        names += [(f"blk.{i}.{t}.weight", shape) for t, shape in SHAPES.items()]
    return names


def expected(quant: str, name: str) -> T:
    """The table, as llama.cpp states it (llama_tensor_get_type & co.), case by case."""
    if name.endswith("_norm.weight"):  # 1-D: the converter writes F32, llama-quantize
        return T.F32  # quantizes only 2-D+ tensors and never "_norm.weight"
    if quant in ("f32", "f16", "bf16", "q8_0"):  # convert_hf_to_gguf --outtype: all 2-D
        return QUANTS[quant]  # .weight tensors in that type, output included
    if quant in ("q4_k", "q5_k"):  # --pure: no per-tensor rules at all
        return QUANTS[quant]
    if name == "output.weight":  # OUTPUT: nx % qk_k == 0 and new_type != Q8_0 -> Q6_K
        return T.Q6_K
    base = {"q4_k_m": T.Q4_K, "q5_k_m": T.Q5_K}.get(quant, QUANTS.get(quant))
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    # attn_v: (Q4_K_M || Q5_K_M) && use_more_bits(i_attention_wv, n_attention_wv) -> Q6_K;
    # ffn_down: Q4_K_M (not Falcon): use_more_bits -> Q6_K; Q5_K_M && use_more_bits -> Q6_K
    if quant in MIXES and ("attn_v" in name or "ffn_down" in name) and layer in MORE_BITS:
        return T.Q6_K
    assert base is not None
    return base  # token_embd (untied), attn_q/k/output, ffn_gate/up: the ftype's default


@pytest.mark.parametrize("quant", [*QUANTS, *MIXES])
def test_llama_7b_types(quant: str) -> None:
    got = {name: tensor_type(quant, name, shape, ModelFacts(LAYERS)) for name, shape in llama_7b()}
    want = {name: expected(quant, name) for name, _ in llama_7b()}
    assert got == want


def test_q4_k_m_longhand() -> None:
    """The Q4_K_M mix, spelled out: 16 of the 32 attn_v and ffn_down in Q6_K."""
    v = [
        tensor_type("q4_k_m", f"blk.{i}.attn_v.weight", (4096, 4096), ModelFacts(32))
        for i in range(32)
    ]
    # layers 0-3 | 4-27 in threes, the third of each Q6_K | 28-31
    table = "6666" + "446" * 8 + "6666"
    assert v == [{"6": T.Q6_K, "4": T.Q4_K}[c] for c in table]
    down = [
        tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", (4096, 11008), ModelFacts(32))
        for i in range(32)
    ]
    assert down == v
    assert tensor_type("q4_k_m", "token_embd.weight", (32000, 4096), ModelFacts(32)) == T.Q4_K
    assert tensor_type("q4_k_m", "output.weight", (32000, 4096), ModelFacts(32)) == T.Q6_K
    assert tensor_type("q5_k_m", "blk.4.attn_v.weight", (4096, 4096), ModelFacts(32)) == T.Q5_K


def test_tied_embeddings_take_the_outputs_type() -> None:
    """has_tied_embeddings (no output.weight): token_embd gets the OUTPUT rule."""
    shape = (128256, 2048)  # Llama-3.2-1B
    assert (
        tensor_type("q4_k_m", "token_embd.weight", shape, ModelFacts(16, tied_embeddings=True))
        == T.Q6_K
    )
    assert (
        tensor_type("q4_0", "token_embd.weight", shape, ModelFacts(16, tied_embeddings=True))
        == T.Q6_K
    )
    assert (
        tensor_type("q8_0", "token_embd.weight", shape, ModelFacts(16, tied_embeddings=True))
        == T.Q8_0
    )
    assert (
        tensor_type("q4_k", "token_embd.weight", shape, ModelFacts(16, tied_embeddings=True))
        == T.Q4_K
    )
    assert tensor_type("q4_k_m", "token_embd.weight", shape, ModelFacts(16)) == T.Q4_K


def test_70b_attn_v_gets_q5_k() -> None:
    """LLM_TYPE_70B: a Q3_K/Q4_K attn_v becomes Q5_K (80 layers: use_more_bits is
    i < 10, i >= 70, or (i - 10) % 3 == 2)."""
    shape = (1024, 8192)
    types = [
        tensor_type("q4_k_m", f"blk.{i}.attn_v.weight", shape, ModelFacts(80, llm_70b=True))
        for i in (9, 10, 12, 13, 70)
    ]
    assert types == [T.Q6_K, T.Q5_K, T.Q6_K, T.Q5_K, T.Q6_K]
    assert (
        tensor_type("q4_k_m", "blk.10.ffn_down.weight", (8192, 28672), ModelFacts(80, llm_70b=True))
        == T.Q4_K
    )
    assert (
        tensor_type("q5_k_m", "blk.10.attn_v.weight", shape, ModelFacts(80, llm_70b=True)) == T.Q5_K
    )


def test_rows_not_whole_blocks_fall_back() -> None:
    """tensor_type_fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 where a row
    is not whole 32-blocks either; an output row that is not whole blocks of the
    default type is Q8_0; the converter's q8_0 falls back to F16."""
    qwen = (896, 896)  # Qwen2.5-0.5B: 896 = 3.5 super-blocks
    assert tensor_type("q4_k_m", "blk.0.attn_q.weight", qwen, ModelFacts(24)) == T.Q5_0
    assert tensor_type("q5_k_m", "blk.5.attn_q.weight", qwen, ModelFacts(24)) == T.Q5_1
    assert (
        tensor_type("q4_k_m", "blk.0.attn_v.weight", (128, 896), ModelFacts(24)) == T.Q8_0
    )  # Q6_K's
    assert tensor_type("q6_k", "blk.0.ffn_up.weight", (4864, 896), ModelFacts(24)) == T.Q8_0
    assert tensor_type("q4_k_m", "blk.0.ffn_down.weight", (896, 4864), ModelFacts(24)) == T.Q6_K
    assert tensor_type("q4_k_m", "output.weight", (151936, 896), ModelFacts(24)) == T.Q8_0
    assert tensor_type("q4_k", "output.weight", (151936, 896), ModelFacts(24)) == T.Q5_0
    assert tensor_type("q4_k_m", "blk.0.attn_q.weight", (100, 100), ModelFacts(24)) == T.F16
    assert tensor_type("q4_0", "blk.0.attn_q.weight", (100, 100), ModelFacts(24)) == T.F16
    assert tensor_type("q8_0", "blk.0.attn_q.weight", (100, 100), ModelFacts(24)) == T.F16
    assert tensor_type("f16", "blk.0.attn_q.weight", (100, 100), ModelFacts(24)) == T.F16


def test_what_stays_f32() -> None:
    """Biases and 1-D tensors, norms, and MoE routers stay F32 (the converter's list)."""
    for quant in ("f16", "q8_0", "q4_k_m", "q4_k"):
        assert tensor_type(quant, "blk.0.attn_q.bias", (896,), ModelFacts(24)) == T.F32
        assert tensor_type(quant, "rope_freqs.weight", (64,), ModelFacts(24)) == T.F32
        assert tensor_type(quant, "blk.0.ffn_gate_inp.weight", (8, 4096), ModelFacts(32)) == T.F32
        assert tensor_type(quant, "blk.0.attn_q_norm.weight", (128,), ModelFacts(28)) == T.F32
        assert tensor_type(quant, "blk.0.scale.weight", (), ModelFacts(28)) == T.F32


def test_a_mix_needs_the_layer_of_attn_v_and_ffn_down() -> None:
    with pytest.raises(ValueError) as caught:
        tensor_type("q4_k_m", "attn_v.weight", (4096, 4096), ModelFacts(32))
    assert (
        str(caught.value) == "attn_v.weight: not a blk.N.* tensor; llama.cpp's rule needs its layer"
    )


def test_unknown_quant_lists_the_valid_names() -> None:
    with pytest.raises(ValueError) as caught:
        tensor_type("q4_k_s", "output.weight", (32000, 4096), ModelFacts(32))
    assert str(caught.value) == (
        "unknown quant 'q4_k_s'; valid: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
        "q4_k, q5_k, q6_k, q4_k_m, q5_k_m"
    )
