"""llama.cpp's view of a Hugging Face checkpoint, for GGUF output (plan/gguf.py), from
config.json and tensor names alone: the GGUF architecture of a family, llama.cpp's name
for each tensor, and which Q/K rows its converter permutes (convert_hf_to_gguf.py's
conversion/llama.py, qwen.py). write/gguf_meta.py writes the rest of the header.

Families: `llama`, `mistral` and `mixtral` (all llama.cpp's `llama` architecture, Q and
K rows permuted: its `llama` graph applies rope to interleaved pairs, transformers to
halves), `qwen2`, `qwen3`, `qwen2_moe` and `qwen3_moe` (their own architectures, rope on
halves: no permutation). A MoE's experts are stacked, one tensor a projection.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import gguf
import numpy as np

from lazymerge.errors import InputError
from lazymerge.read.gguf_model import llama3_freqs

ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp's converter writes Mistral as Llama
    "mixtral": gguf.MODEL_ARCH.LLAMA,  # ... and Mixtral, its experts stacked
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    "olmo2": gguf.MODEL_ARCH.OLMO2,
    "starcoder2": gguf.MODEL_ARCH.STARCODER2,
    "cohere": gguf.MODEL_ARCH.COMMAND_R,
    "phi3": gguf.MODEL_ARCH.PHI3,
}
# The transformers classes (config.json's architectures) convert_hf_to_gguf.py takes, and
# the architecture it writes each as.
CLASSES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "MixtralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2MoeForCausalLM": gguf.MODEL_ARCH.QWEN2MOE,
    "Qwen3MoeForCausalLM": gguf.MODEL_ARCH.QWEN3MOE,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Olmo2ForCausalLM": gguf.MODEL_ARCH.OLMO2,
    "Starcoder2ForCausalLM": gguf.MODEL_ARCH.STARCODER2,
    "CohereForCausalLM": gguf.MODEL_ARCH.COMMAND_R,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}
GEMMAS = frozenset({gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3})
PHI3 = gguf.MODEL_ARCH.PHI3
# llama.cpp's Gemma graphs: which layer count it takes for the 27B model (whose attention
# scale is 1/sqrt(hidden/heads), else 1/sqrt(head_dim)), and its default sliding-window
# pattern (layer i slides when i % n < n - 1).
GEMMA_27B = {gguf.MODEL_ARCH.GEMMA2: 46, gguf.MODEL_ARCH.GEMMA3: 62}
SWA_PATTERN = {gguf.MODEL_ARCH.GEMMA2: 2, gguf.MODEL_ARCH.GEMMA3: 6}
PERMUTED = frozenset({gguf.MODEL_ARCH.LLAMA})  # LlamaModel.undo_permute
# Families gguf-py names otherwise than transformers' model_type does.
GGUF_NAMES = {"mixtral": "llama", "gemma3_text": "gemma3", "cohere": "command-r"}
# What _write_hparams reads; num_key_value_heads defaults to the heads, as in transformers.
REQUIRED = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)
# The norms' epsilon, RMSNorm's or LayerNorm's, as the families' configs name it.
NORM_EPS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")
# Tensors the converter drops (prepare_tensors): buffers some checkpoints saved.
SKIPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's rope scaling, as a tensor (see rope_freqs)


def arch_of(config: dict[str, Any], where: str) -> gguf.MODEL_ARCH:
    """The GGUF architecture of the model `config` (its config.json, at `where`)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise InputError(f"{where}: {_unsupported(model_type)}")
    arch = ARCHS[model_type]
    classes = config.get("architectures")  # none: model_type says enough
    cls = classes[0] if isinstance(classes, list) and classes else None
    if cls is not None and CLASSES.get(str(cls)) != arch:
        raise InputError(
            f"{where}: architectures {cls!r}: llama.cpp's converter has no {cls} for "
            f"model_type {model_type!r} (a GGUF holds a causal LM); write safetensors instead"
        )
    for key in (*REQUIRED, next((k for k in NORM_EPS if k in config), NORM_EPS[0])):
        if not isinstance(config.get(key), int | float) or isinstance(config.get(key), bool):
            raise InputError(f"{where}: no number {key}, which a GGUF states; fix config.json")
    _check_graph(arch, config, where)
    # llama.cpp's qwen2moe/qwen3moe have experts in every layer (no dense MLP tensors)
    if arch in (gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN3MOE) and (
        config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1
    ):
        raise InputError(
            f"{where}: mlp_only_layers/decoder_sparse_step make some layers dense, which "
            f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} cannot hold (experts in every layer)"
        )
    _check_routing(arch, config, where)
    if arch in GEMMAS:
        _check_gemma(arch, config, where)
    return arch


def _check_graph(arch: gguf.MODEL_ARCH, config: dict[str, Any], where: str) -> None:
    """What llama.cpp's starcoder2, command-r, gemma2 and olmo2 graphs need that a config
    may not have: biases; one embedding for input and output (command-r, gemma2: a tied
    config's saved lm_head is the embedding again, and dropped), or two (olmo2);
    Command R+'s q/k norms, which it reads only in a model of 64 layers or more."""
    tied = config.get("tie_word_embeddings", True)
    why = None
    if arch == gguf.MODEL_ARCH.STARCODER2 and config.get("use_bias") is False:
        why = "use_bias false, but llama.cpp's starcoder2 needs its biases"
    elif arch in (gguf.MODEL_ARCH.COMMAND_R, gguf.MODEL_ARCH.GEMMA2) and not tied:
        name = gguf.MODEL_ARCH_NAMES[arch]
        why = f"an lm_head of its own, but llama.cpp's {name} reads the embedding"
    elif (
        arch == gguf.MODEL_ARCH.COMMAND_R
        and config.get("use_qk_norm")
        and config["num_hidden_layers"] < 64
    ):
        why = "use_qk_norm, which llama.cpp's command-r reads only with 64 layers or more"
    elif arch == gguf.MODEL_ARCH.OLMO2 and tied:
        why = "tied embeddings, but llama.cpp's olmo2 needs an output.weight"
    if why is not None:
        raise InputError(f"{where}: {why}; write safetensors")


def _check_gemma(arch: gguf.MODEL_ARCH, config: dict[str, Any], where: str) -> None:
    """What llama.cpp's Gemma graphs fix that a config could set otherwise."""
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    scale = config["hidden_size"] // heads if layers == GEMMA_27B[arch] else head_dim
    if config.get("query_pre_attn_scalar", scale) != scale:
        raise InputError(
            f"{where}: query_pre_attn_scalar {config['query_pre_attn_scalar']}, but "
            f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} scales attention by 1/sqrt({scale}) "
            f"for {layers} layers: its GGUF would compute another model; write safetensors"
        )
    theta = rope_params(config)["rope_theta"]
    if arch == gguf.MODEL_ARCH.GEMMA2 and theta not in (None, 10000, 10000.0):
        raise InputError(
            f"{where}: rope_theta {theta}, but llama.cpp's gemma2 takes 10000 (its converter "
            "writes no rope base for it); write safetensors"
        )
    if arch == gguf.MODEL_ARCH.GEMMA3 and config.get("attn_logit_softcapping") is not None:
        raise InputError(
            f"{where}: attn_logit_softcapping, which llama.cpp's gemma3 has not (its "
            "converter refuses it); write safetensors"
        )


def sliding_layers(arch: gguf.MODEL_ARCH, config: dict[str, Any]) -> list[bool] | None:
    """A Gemma's sliding-window layers (config.json layer_types) where they are not
    llama.cpp's default pattern for it (layers renumbered by slices): a GGUF then says
    them in attention.sliding_window_pattern, which llama.cpp reads; None otherwise."""
    kinds = config.get("layer_types")
    if arch not in SWA_PATTERN or not isinstance(kinds, list):
        return None
    n = SWA_PATTERN[arch]
    slides = [kind == "sliding_attention" for kind in kinds]
    return None if slides == [i % n < n - 1 for i in range(len(kinds))] else slides


def norm_shift(arch: gguf.MODEL_ARCH, hf_name: str) -> float:
    """What llama.cpp's converter adds to a tensor's values: 1 to a Gemma's norms."""
    return 1.0 if arch in GEMMAS and hf_name.endswith("norm.weight") else 0.0


def dropped(arch: gguf.MODEL_ARCH, hf_name: str) -> bool:
    """A tensor the converter leaves out: saved buffers, and Gemma 2's lm_head (its
    graph always reads the embedding as the output)."""
    return skipped(hf_name) or (arch == gguf.MODEL_ARCH.GEMMA2 and hf_name == "lm_head.weight")


# llama.cpp's graphs fix whether a token's top-k expert weights are renormalised:
# qwen3moe does (its build_moe_ffn norm_w true), qwen2moe does not; no key says otherwise.
NORMALISED = {gguf.MODEL_ARCH.QWEN2MOE: False, gguf.MODEL_ARCH.QWEN3MOE: True}


def _check_routing(arch: gguf.MODEL_ARCH, config: dict[str, Any], where: str) -> None:
    if arch not in NORMALISED:
        return
    if bool(config.get("norm_topk_prob", False)) != NORMALISED[arch]:
        raise InputError(
            f"{where}: norm_topk_prob {config.get('norm_topk_prob', False)}, but llama.cpp's "
            f"{gguf.MODEL_ARCH_NAMES[arch]} always uses {NORMALISED[arch]} (no GGUF key says "
            "otherwise): its GGUF would compute another model; write safetensors"
        )


def n_experts(config: dict[str, Any]) -> int:
    """The model's experts (0: a dense model), as the converter reads them."""
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def _unsupported(model_type: object) -> str:
    known = ", ".join(ARCHS)
    if not isinstance(model_type, str):
        return f"no model_type, so no GGUF architecture to write (lazymerge writes {known})"
    name = GGUF_NAMES.get(model_type, model_type)
    flat = {re.sub("[-_]", "", n): n for n in gguf.MODEL_ARCH_NAMES.values()}
    if (arch := flat.get(re.sub("[-_]", "", name))) is not None:
        return (
            f"model_type {model_type!r}: GGUF output is not supported yet for it (lazymerge "
            f"writes {known}); write safetensors and convert them with llama.cpp's "
            f"convert_hf_to_gguf.py (it knows {arch!r})"
        )
    return (
        f"model_type {model_type!r}: llama.cpp's converter has no architecture for it "
        f"(lazymerge writes GGUF for {known}); write safetensors instead"
    )


def skipped(hf_name: str) -> bool:
    """Whether llama.cpp's converter leaves this tensor out of a GGUF (a saved buffer)."""
    return hf_name.endswith(SKIPPED)


@cache
def _name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_layers)


def tensor_name(arch: gguf.MODEL_ARCH, hf_name: str, n_layers: int) -> str:
    """llama.cpp's name for the Hugging Face tensor `hf_name` ("blk.3.attn_q.weight")."""
    name = _name_map(arch, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise InputError(
            f"{hf_name}: llama.cpp has no name for this tensor in a "
            f"{gguf.MODEL_ARCH_NAMES[arch]} GGUF of {n_layers} layers; drop it from the "
            f"merge or write safetensors"
        )
    return str(name)


# A MoE's per-expert tensor (`mlp.experts.3.up_proj.weight`, Mixtral's
# `block_sparse_moe.experts.3.w1.weight`): llama.cpp's converter stacks the experts of each
# projection into one tensor, named as the name without the expert number.
EXPERT = re.compile(r"(?P<head>.+\.experts)\.(?P<e>\d+)\.(?P<tail>.+)")


def gguf_target(arch: gguf.MODEL_ARCH, hf_name: str, n_layers: int) -> tuple[str, int | None]:
    """llama.cpp's tensor for the Hugging Face tensor `hf_name`, and the expert it is
    within that tensor (None: the whole tensor)."""
    m = EXPERT.fullmatch(hf_name)
    if m is None:
        return tensor_name(arch, hf_name, n_layers), None
    return tensor_name(arch, f"{m['head']}.{m['tail']}", n_layers), int(m["e"])


def permuted_heads(arch: gguf.MODEL_ARCH, hf_name: str, config: dict[str, Any]) -> int | None:
    """The head count whose row permutation (row_order) llama.cpp's converter applies to
    this tensor: the query heads for q_proj, the key/value heads for k_proj; else None."""
    if arch not in PERMUTED:
        return None
    n_head = int(config["num_attention_heads"])
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return int(config.get("num_key_value_heads") or n_head)
    return None


def row_order(rows: int, heads: int) -> np.ndarray:
    """The permutation as row indices: GGUF row r is Hugging Face row `row_order[r]`.
    Each head's rows (first half, second half) become pairs, interleaved."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters` (a Gemma 3's full-attention ones), or 4's
    `rope_scaling` and `rope_theta`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", config.get("rope_theta"))
    params.setdefault("rope_type", params.get("type") or "default")
    return params


def rope_freqs(arch: gguf.MODEL_ARCH, config: dict[str, Any]) -> np.ndarray | None:
    """The `rope_freqs.weight` tensor (float32, head_dim/2) llama.cpp's converter adds
    for Llama 3.1's rope scaling: each frequency's divisor; None for other ropes."""
    rope = rope_params(config)
    if arch != gguf.MODEL_ARCH.LLAMA or str(rope["rope_type"]).lower() != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = rope["rope_theta"] if rope["rope_theta"] is not None else 10000.0
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    return llama3_freqs(dim, base, (factor, low, high, old_ctx))


@dataclass(frozen=True)
class Phi3Rope:
    """Phi3MiniModel's rope: the original context, the rotated dimensions, and for a
    long-context model (longrope) the per-frequency factors llama.cpp reads as the
    rope_factors_long/short tensors, with its attention factor."""

    original_context: int
    dims: int
    long: tuple[float, ...] = ()
    short: tuple[float, ...] = ()
    attn_factor: float | None = None


def phi3_rope(config: dict[str, Any], where: str) -> Phi3Rope:
    rope = rope_params(config)
    orig = int(rope.get("original_max_position_embeddings")
               or config.get("original_max_position_embeddings") or 4096)  # fmt: skip
    share = rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    dims = int(share * config["hidden_size"]) // config["num_attention_heads"]
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return Phi3Rope(orig, dims)
    kind = str(rope["rope_type"]).lower()
    scale = config["max_position_embeddings"] / orig
    if kind not in ("su", "longrope", "yarn") or not isinstance(short, list):
        raise InputError(f"{where}: rope_type {kind!r} with long_factor: llama.cpp's phi3 reads "
                         "su, longrope and yarn factors (long and short); write safetensors")  # fmt: skip
    if len(long) != dims // 2 or len(short) != dims // 2:
        raise InputError(f"{where}: long_factor and short_factor need {dims // 2} values each")
    if kind == "yarn":
        factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    return Phi3Rope(orig, dims, tuple(map(float, long)), tuple(map(float, short)), factor)
