"""A llama.cpp GGUF as a Hugging Face checkpoint: its tensors under transformers' names
and shapes, each a `TensorRef` whose `Blocks` tell the mapped reader how to decode its
rows (dequantize, undo the Q/K row permutation), and a config.json built from its
metadata. The inverse of what plan/gguf.py and write/gguf_meta.py write, for the
families GGUF output covers: llama (Llama, Mistral), qwen2, qwen3.

transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`) is the tests'
reference for the names, the permutation and the config; gguf-py's quantizers decode.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge.errors import InputError
from lazymerge.read.gguf import GgufFile, GgufTensor, read_model
from lazymerge.read.tensorref import Blocks, TensorRef

if TYPE_CHECKING:
    import numpy as np

# GGUF architecture -> transformers' model_type and class.
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PERMUTED = frozenset({"llama"})  # llama.cpp's converter permutes Q/K rows of these
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's rope scaling as a tensor: in the config here
PLAIN = {0: "F32", 1: "F16", 30: "BF16", 28: "F64", 24: "I8", 25: "I16", 26: "I32", 27: "I64"}
# Llama 3's rope scalings as published (factor, low, high, original context): the one
# whose frequencies equal a GGUF's rope_freqs tensor is its config's rope_scaling.
LLAMA3_ROPES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def gguf_tensors(path: Path) -> dict[str, TensorRef]:
    """The tensors of a GGUF file under transformers' names, in the file's order."""
    g = read_model(path)
    arch = family(g)
    heads = _heads(g, arch)
    refs = {}
    for t in g.tensors:
        if t.name == ROPE_FREQS:
            continue  # its values are the config's rope_scaling (gguf_config)
        name = hf_name(t.name)
        if name is None:
            raise InputError(
                f"{path}: tensor {t.name!r} has no transformers name in a {arch} model; "
                "lazymerge reads GGUF llama, qwen2 and qwen3 models"
            )
        refs[name] = _ref(name, t, heads.get(t.name.split(".")[-2]))
    return refs


def family(g: GgufFile) -> str:
    arch = g.get("general.architecture")
    if arch not in FAMILIES:
        raise InputError(
            f"{g.path}: GGUF architecture {arch!r}: lazymerge reads GGUF "
            f"{', '.join(FAMILIES)} models; convert it with llama.cpp's tools first"
        )
    return str(arch)


def hf_name(gguf_name: str) -> str | None:
    """transformers' name for llama.cpp's `gguf_name` ("blk.3.attn_q.weight")."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in TOP:
        return f"{TOP[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m is None or m.group(2) not in LAYER:
        return None
    return f"model.layers.{int(m.group(1))}.{LAYER[m.group(2)]}.{suffix}"


def _heads(g: GgufFile, arch: str) -> dict[str, int]:
    """The head count whose permutation each of attn_q, attn_k carries (none: qwen)."""
    if arch not in PERMUTED:
        return {}
    n_head = _int(g, f"{arch}.attention.head_count")
    return {"attn_q": n_head, "attn_k": _int(g, f"{arch}.attention.head_count_kv", n_head)}


def _ref(name: str, t: GgufTensor, heads: int | None) -> TensorRef:
    from gguf import GGMLQuantizationType

    path, shape, dtype = t.path, t.shape, PLAIN.get(t.qtype)
    if heads is not None and shape[0] % (2 * heads):
        raise InputError(
            f"{path}: {t.name} has {shape[0]} rows, not pairs of rows for each of {heads} "
            "heads; its head counts are wrong"
        )
    if dtype is not None and heads is None:
        return TensorRef(name, path, dtype, shape, t.offset, t.nbytes)
    type_name = GGMLQuantizationType(t.qtype).name
    if dtype is None and (len(shape) < 2 or not _decodable(t.qtype)):
        why = "a vector" if len(shape) < 2 else "a type gguf-py cannot decode"
        raise InputError(f"{path}: {t.name} is {type_name} {why}; lazymerge cannot read it")
    blocks = Blocks(t.qtype, type_name, heads)
    return TensorRef(name, path, dtype or "F32", shape, t.offset, t.nbytes, blocks=blocks)


def _decodable(qtype: int) -> bool:
    from gguf import GGMLQuantizationType, quants

    return GGMLQuantizationType(qtype) in quants._type_traits


def gguf_order(rows: int, heads: int) -> np.ndarray:
    """Where each transformers row lies in llama.cpp's order: row j is GGUF row
    `gguf_order[j]`. llama.cpp's converter interleaves each head's two halves
    (meaning/gguf.py's row_order is this permutation's inverse)."""
    import numpy as np

    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def decode_rows(raw: np.ndarray, ref: TensorRef, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `ref` in transformers' order, from `raw`, its bytes as
    (rows, bytes per row) uint8: a plain dtype's bytes (still to view), or float32 values
    (a quantized type, dequantized by gguf-py)."""
    from gguf import GGMLQuantizationType, quants

    assert ref.blocks is not None
    picked = raw[start:stop]
    if ref.blocks.heads is not None:
        picked = raw[gguf_order(ref.rows, ref.blocks.heads)[start:stop]]
    if ref.blocks.qtype in PLAIN:
        return picked
    return quants.dequantize(picked, GGMLQuantizationType(ref.blocks.qtype))


def gguf_config(path: Path) -> dict[str, Any]:
    """A config.json for the GGUF's model, from its metadata (transformers' GGUF loader
    builds the same keys)."""
    g = read_model(path)
    arch = family(g)
    n_head = _int(g, f"{arch}.attention.head_count")
    embd = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise InputError(f"{path}: no token_embd.weight, so no vocabulary size; not a model")
    config: dict[str, Any] = {
        "architectures": [FAMILIES[arch]],
        "model_type": arch,
        "num_hidden_layers": _int(g, f"{arch}.block_count"),
        "hidden_size": _int(g, f"{arch}.embedding_length"),
        "intermediate_size": _int(g, f"{arch}.feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": _int(g, f"{arch}.attention.head_count_kv", n_head),
        "rms_norm_eps": _float(g, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _float(g, f"{arch}.rope.freq_base", 10000.0),
        "vocab_size": embd.shape[0],
        "tie_word_embeddings": not any(t.name == "output.weight" for t in g.tensors),
    }
    if f"{arch}.context_length" in g.fields:
        config["max_position_embeddings"] = _int(g, f"{arch}.context_length")
    if f"{arch}.attention.key_length" in g.fields:
        config["head_dim"] = _int(g, f"{arch}.attention.key_length")
    for key in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in g.fields:
            token = _int(g, f"tokenizer.ggml.{key}_token_id", least=0)
            config[f"{'pad' if key == 'padding' else key}_token_id"] = token
    if (scaling := _rope_scaling(g, arch, config)) is not None:
        config["rope_scaling"] = scaling
    return config


def _int(g: GgufFile, key: str, default: int | None = None, least: int = 1) -> int:
    """An integer setting, at least `least` (counts and sizes: 1)."""
    value = g.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{g.path}: no integer {key} in the GGUF's metadata; not a model file")
    if value < least:
        raise InputError(f"{g.path}: {key} is {value}; the file is damaged")
    return value


def _float(g: GgufFile, key: str, default: float) -> float:
    value = g.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InputError(f"{g.path}: {key} is {value!r}, not a number; the file is damaged")
    return float(value)


def _rope_scaling(g: GgufFile, arch: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The config's rope_scaling: llama.cpp's rope.scaling keys, or Llama 3's, which the
    converter wrote as the rope_freqs tensor (recognised by its exact values)."""
    kind = g.get(f"{arch}.rope.scaling.type")
    freqs = next((t for t in g.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        return _llama3_rope(g, freqs, config)
    if kind in (None, "none"):
        return None
    factor = _float(g, f"{arch}.rope.scaling.factor", 1.0)
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": factor}
    if f"{arch}.rope.scaling.original_context_length" in g.fields:
        ctx = _int(g, f"{arch}.rope.scaling.original_context_length")
        scaling["original_max_position_embeddings"] = ctx
    return scaling


def _llama3_rope(g: GgufFile, freqs: GgufTensor, config: dict[str, Any]) -> dict[str, Any]:
    if freqs.qtype != 0:
        raise InputError(f"{g.path}: rope_freqs.weight is not F32; the file is damaged")
    import numpy as np

    with open(freqs.path, "rb") as f:
        f.seek(freqs.offset)
        have = np.frombuffer(f.read(freqs.nbytes), "<f4")
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for scaling in LLAMA3_ROPES:
        if np.array_equal(have, llama3_freqs(dim, config["rope_theta"], scaling)):
            keys = (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
            return {"rope_type": "llama3", **dict(zip(keys, scaling, strict=True))}
    raise InputError(
        f"{g.path}: its rope_freqs tensor is no Llama 3 rope scaling lazymerge knows, so no "
        "config.json can state it"
    )


def llama3_freqs(dim: int, theta: float, scaling: tuple[float, float, float, int]) -> np.ndarray:
    """llama.cpp's converter's rope_freqs.weight for Llama 3's rope scaling (factor, low
    and high frequency factors, original context): each frequency's divisor
    (meaning/gguf.rope_freqs writes them; read here to recognise them)."""
    import numpy as np

    factor, low, high, old_ctx = scaling
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0, 1 / ((1 - smooth) / factor + smooth))
    return np.where(wavelen > old_ctx / low, factor, out).astype(np.float32)
