"""Which GGUF type llama.cpp gives each tensor for a quant name, and how many bytes a row
of it takes: pure functions over names and shapes, for the plan (plan/gguf.py);
write/quants.py encodes the bytes."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lazymerge.recipe.spec import GGUF_MIXES, GGUF_QUANTS

T = GGMLQuantizationType
MIXES: tuple[str, ...] = GGUF_MIXES  # llama.cpp's mixes
# The quant names that are one type each: the recipe's, but the mixes.
QUANTS: dict[str, GGMLQuantizationType] = {
    q: GGMLQuantizationType[q.upper()] for q in GGUF_QUANTS if q not in MIXES
}


def row_bytes(columns: int, qtype: GGMLQuantizationType | int) -> int:
    """Bytes of one row of `columns` elements in `qtype`."""
    block, size = GGML_QUANT_SIZES[T(qtype)]
    if columns % block:
        raise ValueError(f"a row of {columns} is not whole {T(qtype).name} blocks of {block}")
    return columns // block * size


# ---- which type llama.cpp gives each tensor ------------------------------------------------

# convert_hf_to_gguf.py (conversion/base.py, prepare_tensors) keeps these float32 at any
# --outtype, and llama-quantize leaves them so (those a Llama-family model can have).
_KEEP_F32 = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "position_embd.weight",
    "token_types.weight",
)  # fmt: skip
_CONVERTER = ("f32", "f16", "bf16", "q8_0")  # its --outtype choices
_PURE = ("q4_k", "q5_k")  # llama-quantize --pure: its plain "Q4_K" means Q4_K_M
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}  # tensor_type_fallback


def gguf_shape(quant: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a GGUF states for a tensor: llama-quantize rewrites each with
    ggml_n_dims, dropping outer dimensions of 1 (Qwen2-MoE's shared-expert gate [1, n]
    becomes [n]); the converter's outtypes keep the checkpoint's."""
    if quant in _CONVERTER:
        return shape
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's type rules read about the whole model."""

    n_layers: int
    tied_embeddings: bool = False  # no output.weight: token_embd.weight is typed as it
    llm_70b: bool = False  # LLM_TYPE_70B (see _mix_type)
    n_expert: int = 0  # a MoE's experts


def tensor_type(
    quant: str, name: str, shape: tuple[int, ...], model: ModelFacts
) -> GGMLQuantizationType:
    """The type llama.cpp gives GGUF tensor `name` of (HF-order) `shape` for `quant`.

    f32/f16/bf16/q8_0: convert_hf_to_gguf.py --outtype; q4_k, q5_k: llama-quantize
    --pure; the rest: llama-quantize with that ftype, no imatrix (output.weight Q6_K, and
    _mix_type's and _eight_experts' rules). 1-D tensors and norms stay F32; a row that is
    not whole blocks falls back as llama.cpp's does.

    Raises:
        ValueError: `quant` is not a name in QUANTS or MIXES (the message lists them).
    """
    if quant not in QUANTS and quant not in MIXES:
        raise ValueError(f"unknown quant {quant!r}; valid: {', '.join([*QUANTS, *MIXES])}")
    if len(shape) <= 1 or name.endswith(_KEEP_F32) or not name.endswith(".weight"):
        return T.F32
    columns = shape[-1]
    if quant in _CONVERTER:
        qtype = QUANTS[quant]  # gguf-py's QuantError -> F16
        return qtype if columns % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16
    default = QUANTS[quant[:4]]  # q4_k_m -> q4_k: llama_ftype_get_default_type
    if quant in _PURE:
        return _fallback(default, columns)
    if name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight"):
        # Q8_0 if the row is not whole blocks of the default type, else Q6_K
        qtype = T.Q8_0 if columns % GGML_QUANT_SIZES[default][0] else T.Q6_K
    elif (moe := _eight_experts(quant, name) if model.n_expert == 8 else None) is not None:
        qtype = moe
    else:
        mixed = quant in MIXES
        qtype = _mix_type(name, default, model.n_layers, model.llm_70b) if mixed else default
    return _fallback(qtype, columns)


def _eight_experts(quant: str, name: str) -> GGMLQuantizationType | None:
    """llama-quant.cpp's rules for a model of exactly 8 experts ("for the 8-expert model,
    bumping this to Q8_0"): attn_v and attn_k Q8_0 in every preset, attn_output Q5_K in
    Q4_K_M; None where they say nothing."""
    if name.endswith(("attn_v.weight", "attn_k.weight")):
        return T.Q8_0
    if quant == "q4_k_m" and name.endswith("attn_output.weight"):
        return T.Q5_K
    return None


def _mix_type(
    name: str, default: GGMLQuantizationType, n_layers: int, llm_70b: bool
) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl's Q4_K_M / Q5_K_M rules for a dense model's tensor:
    attn_v and ffn_down of use_more_bits layers Q6_K; a 70B's (80 layers, grouped-query
    attention) attn_v Q5_K for Q4_K."""
    # tensor_get_category: attn_qkv and attn_kv_b count as attn_v; ffn_down is a substring
    attn_v = any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))
    if not attn_v and "ffn_down" not in name:
        return default
    if _use_more_bits(_layer_of(name), n_layers):
        return T.Q6_K
    if attn_v and llm_70b and default == T.Q4_K:
        return T.Q5_K  # a 70B's attn_v is 8x smaller than attn_q: more bits are cheap
    return default


def _layer_of(name: str) -> int:
    """N of blk.N.*. llama.cpp counts attn_v / ffn_down tensors in its loader's order
    (by layer, then name): for one a layer, that count is the layer number."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdecimal():
        raise ValueError(f"{name}: not a blk.N.* tensor; llama.cpp's rule needs its layer")
    return int(parts[1])


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers, and every third between."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def _fallback(qtype: GGMLQuantizationType, columns: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a row that is not whole blocks of `qtype` takes a 32-block
    type, and one that is not whole 32-blocks either, F16."""
    if columns % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if columns % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16
