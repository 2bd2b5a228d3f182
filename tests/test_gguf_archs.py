"""GGUF output beyond the Llama family (issue 18): the mixture-of-experts models Mixtral
(llama.cpp's `llama` with experts), Qwen2-MoE and Qwen3-MoE, and Gemma 2 and Gemma 3.
llama.cpp's converter stacks each projection's experts into one tensor [experts, rows,
columns]; its quantizer has rules for 8-expert models; Qwen2-MoE's shared-expert gate is
F32, 2-D from the converter, 1-D once quantized. A Gemma's norms are stored plus one
(added in float16 for a float16 checkpoint), Gemma 2's lm_head is left out.

References: gguf-py's own tensor-name map and quantizers on the safetensors output,
experts stacked and Q/K permuted longhand here; the type table llama.cpp's quantizer
(libllama 0.3.36) was observed to write for these presets; transformers' GGUF loader
(Qwen3-MoE, Qwen2-MoE); llama.cpp itself where llama-cpp-python imports (optional).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import yaml

from lazymerge.testing_tokenizer import write_tokenizer

from conftest import error_of, load_merged, run_cli

VOCAB, HIDDEN, HEADS, KV_HEADS = 320, 256, 4, 2
FAMILIES = {  # model_type -> (GGUF architecture, config extras)
    "mixtral": ("llama", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 512}),
    # moe and shared widths as Qwen2MoeConfig's defaults: transformers' GGUF loader reads
    # neither from the file. 1408 is not whole 256-blocks: the k-quants fall back.
    "qwen2_moe": ("qwen2moe", {"num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 1408, "intermediate_size": 512,
                               "shared_expert_intermediate_size": 5632}),
    "qwen3_moe": ("qwen3moe", {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 64,
                               "moe_intermediate_size": 768, "intermediate_size": 512,
                               "norm_topk_prob": True}),
    # llama.cpp scales a (non-27B) Gemma's attention by 1/sqrt(head_dim), transformers by
    # query_pre_attn_scalar, which its GGUF loader leaves at 256: head_dim 256, as Gemma's.
    "gemma2": ("gemma2", {"head_dim": 256, "query_pre_attn_scalar": 256,
                          "intermediate_size": 512, "tie_word_embeddings": True}),
    "gemma3_text": ("gemma3", {"head_dim": 256, "query_pre_attn_scalar": 256,
                               "intermediate_size": 512, "tie_word_embeddings": True}),
    # Dense families whose converters only rename (llama.cpp's keys aside): OLMo 2 (its
    # output.weight required), StarCoder2 (LayerNorm with biases), Command R (tied).
    "olmo2": ("olmo2", {"intermediate_size": 512}),
    "starcoder2": ("starcoder2", {"intermediate_size": 512, "tie_word_embeddings": True}),
    "cohere": ("command-r", {"intermediate_size": 512, "tie_word_embeddings": True}),
    # Phi 3: qkv_proj and gate_up_proj stay fused (attn_qkv, ffn_up)
    "phi3": ("phi3", {"intermediate_size": 512, "original_max_position_embeddings": 256,
                      "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}  # fmt: skip
GEMMAS = ("gemma2", "gemma3_text")
EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(.+)")


def make_moe(directory: Path, model_type: str, seed: int, **changes: Any) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256, "tie_word_embeddings": False,
        **FAMILIES[model_type][1], **changes,
    }  # fmt: skip
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.to(torch.float16).save_pretrained(directory)
    write_tokenizer(directory, VOCAB, seed=seed)
    return directory


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(model_type, its work directory with the recipe, the safetensors merge)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    make_moe(root / "base", model_type, seed=1)
    make_moe(root / "other", model_type, seed=2)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": "base", "other": "other",
                                      "gradient": {"values": [0.2, 0.8]}}))  # fmt: skip
    assert run_cli("merge", recipe, "-o", root / "st", "-q") == 0
    return model_type, recipe, load_merged(root / "st")


def gguf_of(recipe: Path, quant: str) -> Path:
    out = recipe.parent / quant
    if not out.exists():
        assert run_cli("merge", recipe, "-o", out, "-q", "--format", "gguf", "--quant", quant) == 0
    return out / f"model-{quant}.gguf"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (LlamaModel.permute), longhand."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def expected(model_type: str, st: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The safetensors merge as llama.cpp's converter lays it out: gguf-py's names, each
    projection's experts stacked in expert order, Mixtral's Q/K rows permuted."""
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == FAMILIES[model_type][0])
    names = gguf.get_tensor_name_map(arch, 2)
    stacks: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, t in st.items():
        w = t.float().numpy()
        if model_type in GEMMAS and name.endswith("norm.weight"):  # + 1 in the tensor's dtype
            w = (t + 1).float().numpy() if t.dtype == torch.float16 else w + np.float32(1)
        if model_type == "gemma2" and name == "lm_head.weight":
            continue
        if model_type == "mixtral" and "q_proj" in name:
            w = permute(w, HEADS)
        elif model_type == "mixtral" and "k_proj" in name:
            w = permute(w, KV_HEADS)
        if (m := EXPERT.fullmatch(name)) is not None:
            stacks.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = w
    for name, experts in stacks.items():
        stacked = np.stack([experts[e] for e in range(len(experts))])
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = stacked
    return out


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_every_tensor_is_the_converters_layout_quantized(family: Any, quant: str) -> None:
    """Each GGUF tensor's bytes are gguf-py's quantizer applied to the converter's layout
    of the safetensors merge (experts stacked, Mixtral's Q/K permuted)."""
    model_type, recipe, st = family
    want = expected(model_type, st)
    reader = gguf.GGUFReader(gguf_of(recipe, quant))
    assert {t.name for t in reader.tensors} == set(want)
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        values = want[t.name]
        if t.name.endswith("ffn_gate_inp_shexp.weight") and quant == "q4_0":
            assert list(t.shape) == [HIDDEN]  # llama-quantize's ggml_n_dims: 1-D
            values = values.reshape(-1)
        elif t.name.endswith("ffn_gate_inp_shexp.weight"):
            assert [int(n) for n in t.shape] == [HIDDEN, 1]  # the converter's: 2-D
        else:  # the declared shape too (GGUF lists dims innermost first): not only bytes
            assert list(reversed([int(n) for n in t.shape])) == list(values.shape), t.name
        raw = encoded(values, qtype)
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(raw).tobytes(), t.name


def encoded(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """gguf-py's quantizer; for the k-quants, which it cannot write, llama.cpp's C bytes
    as lazymerge reproduces them (checked against the C in test_gguf_quants.py)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return values
    if qtype.name.endswith("_K"):
        from lazymerge.write.quants import encode

        return encode(values.reshape(-1, values.shape[-1]), qtype)
    return gguf.quants.quantize(values, qtype)


# llama.cpp's quantizer (libllama 0.3.36, run on an 8-expert model of 2 layers), no imatrix.
EIGHT_EXPERTS = {
    "q4_k_m": {"attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q5_K",
               "ffn_gate_inp": "F32", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K",
               "output": "Q6_K", "token_embd": "Q4_K"},
    "q4_0": {"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q4_0",
             "ffn_gate_inp": "F32", "ffn_down_exps": "Q4_0", "output": "Q6_K"},
    "q4_k": {"attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "Q4_K", "output": "Q4_K"},  # --pure
}  # fmt: skip


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)
@pytest.mark.parametrize("quant", sorted(EIGHT_EXPERTS))
def test_eight_experts_get_llama_cpps_types(family: Any, quant: str) -> None:
    """An 8-expert model (Mixtral): attn_k and attn_v Q8_0 in every preset, attn_output
    Q5_K for Q4_K_M; the router F32; --pure (our q4_k) none of it."""
    _, recipe, _ = family
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name
             for t in gguf.GGUFReader(gguf_of(recipe, quant)).tensors}  # fmt: skip
    for short, want in EIGHT_EXPERTS[quant].items():
        for name, got in types.items():
            if name.split(".")[-2] == short:
                assert got == want, (name, got, want)


@pytest.mark.parametrize(
    "family", ["qwen2_moe", "qwen3_moe", *GEMMAS, "starcoder2", "phi3"], indirect=True
)
def test_transformers_loads_it(family: Any) -> None:
    """transformers' GGUF loader reads the Qwen MoEs, the Gemmas, StarCoder2, Phi 3 (Mixtral
    it would take as a dense Llama, OLMo 2 and Command R not at all): their f16 with the
    safetensors merge's logits (a Gemma's norms minus one again); Qwen2-MoE's in its
    llama-quantize form (a 1-D shared-expert gate, the only one it reads) with the logits
    of the safetensors merge whose every weight is replaced by its q5_k_m value (the
    converter's layout quantized and dequantized here, longhand)."""
    from transformers import AutoModelForCausalLM

    model_type, recipe, st = family  # (a Mixtral GGUF it would read as a dense Llama)
    quant = "q5_k_m" if model_type == "qwen2_moe" else "f16"
    path = gguf_of(recipe, quant)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 257]])
    ref = AutoModelForCausalLM.from_pretrained(recipe.parent / "st", dtype=torch.float32)
    if quant != "f16":
        ref.load_state_dict(quantized(model_type, st, path), strict=True)
    ours = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids).logits
    assert float((got - want).abs().max()) <= 0.005 * float(want.abs().max())


def quantized(model_type: str, st: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The safetensors merge with each weight as the GGUF's type holds it: the expected
    layout encoded and decoded, then unstacked back to the merge's names (transformers'
    fused experts are built from them by load_state_dict's conversion)."""
    types = {
        t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(path).tensors
    }
    layout = expected(model_type, st)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == FAMILIES[model_type][0])
    names = gguf.get_tensor_name_map(arch, 2)
    out = {}
    for name, t in st.items():
        m = EXPERT.fullmatch(name)
        stacked = f"{m[1]}.{m[3]}" if m else name
        gname = names.get_name(stacked, try_suffixes=(".weight", ".bias"))
        values = layout[gname]
        decoded = gguf.quants.dequantize(encoded(values, types[gname]), types[gname])
        decoded = decoded.reshape(values.shape)
        out[name] = torch.from_numpy(decoded[int(m[2])] if m else decoded).reshape(t.shape)
    return fused(out)


def fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors as transformers 5 holds them: gate_up_proj [E, 2I, H] (gate
    rows first), down_proj [E, H, I]."""
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m is None:
            out[name] = t
        else:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = t
    for prefix, parts in experts.items():
        n = len(parts["gate_proj"])
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(n)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    return out


def test_llama_cpp_runs_them(family: Any) -> None:
    """Optional (llama-cpp-python): llama.cpp's own graph on our f16 GGUF, the safetensors
    merge's logits in transformers (measured 0.06 % of the largest for the MoEs)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    _, recipe, _ = family
    ids = [1, 5, 9, 17, 33, 65, 129, 257]
    llm = llama_cpp.Llama(model_path=str(gguf_of(recipe, "f16")), n_ctx=64, logits_all=True,
                          n_threads=1, verbose=False)  # fmt: skip
    llm.eval(ids)
    ref = AutoModelForCausalLM.from_pretrained(recipe.parent / "st", dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - want).max() <= 0.005 * np.abs(want).max()


@pytest.mark.parametrize(
    ("model_type", "change", "says"),
    [
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob False"),
        ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob True"),
        ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("gemma2", {"query_pre_attn_scalar": 144}, "scales attention by 1/sqrt(256)"),
        ("gemma2", {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, "rope_theta"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("starcoder2", {"use_bias": False}, "needs its biases"),
        ("cohere", {"tie_word_embeddings": False}, "an lm_head of its own"),
        ("gemma2", {"tie_word_embeddings": False}, "llama.cpp's gemma2 reads the embedding"),
        ("olmo2", {"tie_word_embeddings": True}, "needs an output.weight"),
    ],
)
def test_moes_llama_cpp_would_compute_otherwise_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_type: str, change: dict[str, Any],
    says: str,
) -> None:  # fmt: skip
    """llama.cpp's graphs fix top-k renormalisation (qwen3moe on, qwen2moe off), experts
    in every layer, a Gemma's attention scale (by its layer count), Gemma 2's rope base,
    no attention softcap in Gemma 3, biases in StarCoder2, tied embeddings in Command R and
    untied ones in OLMo 2: a model that says otherwise would be another model, or none."""
    base = make_moe(tmp_path / "base", model_type, seed=1)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    err = error_of(capsys, "gradient", base, base, "--values", "0.5", "-o", out,
                   "--format", "gguf", "--quant", "q8_0")  # fmt: skip
    assert says in err
    assert not out.exists()


def test_a_gemmas_sliding_layers_go_into_the_file_when_not_llama_cpps_default() -> None:
    """llama.cpp's default sliding-window pattern (Gemma 2: every other layer from the
    first; Gemma 3: five of six): a checkpoint whose layer_types follow it needs no key; a
    renumbered one (layer surgery) gets attention.sliding_window_pattern, per layer."""
    from lazymerge.meaning.gguf import sliding_layers

    g2, g3 = gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3
    s, f = "sliding_attention", "full_attention"
    assert sliding_layers(g2, {"layer_types": [s, f, s, f]}) is None
    assert sliding_layers(g2, {"layer_types": [s, f, f, s]}) == [True, False, False, True]
    assert sliding_layers(g3, {"layer_types": [s] * 5 + [f] + [s] * 2}) is None
    assert sliding_layers(g3, {"layer_types": [s, f, s]}) == [True, False, True]
    assert sliding_layers(gguf.MODEL_ARCH.LLAMA, {"layer_types": [f, f]}) is None


def test_a_long_context_phi3_carries_its_rope_factors(tmp_path: Path) -> None:
    """Phi 3's longrope: llama.cpp reads the long and short factors as F32 tensors and an
    attention factor key, sqrt(1 + ln(scale) / ln(original context)) (Phi3MiniModel's
    generate_extra_tensors), and its rotated dimensions."""
    import math

    long, short = [1.0 + i / 16 for i in range(32)], [1.0 - i / 64 for i in range(32)]
    rope = {"rope_type": "longrope", "long_factor": long, "short_factor": short}
    base = make_moe(tmp_path / "base", "phi3", seed=1, max_position_embeddings=1024,
                    rope_scaling=rope)  # fmt: skip
    out = tmp_path / "out"
    args = ("gradient", base, base, "--values", "0.5", "-o", out, "-q")
    assert run_cli(*args, "--format", "gguf", "--quant", "q8_0") == 0
    reader = gguf.GGUFReader(out / "model-q8_0.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert np.array_equal(tensors["rope_factors_long.weight"], np.float32(long))
    assert np.array_equal(tensors["rope_factors_short.weight"], np.float32(short))
    keys = {k: f.contents() for k, f in reader.fields.items()}
    assert keys["phi3.rope.scaling.attn_factor"] == pytest.approx(
        math.sqrt(1 + math.log(1024 / 256) / math.log(256)), rel=1e-6
    )
    assert keys["phi3.rope.scaling.original_context_length"] == 256
    assert keys["phi3.rope.dimension_count"] == HIDDEN // HEADS
    assert "phi3.attention.layer_norm_rms_epsilon" in keys
