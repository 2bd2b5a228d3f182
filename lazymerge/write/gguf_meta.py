"""What a llama.cpp GGUF says besides its tensors' data, for the Llama family: the
architecture, tensor names, Q/K row order, hyperparameters and tokenizer, as llama.cpp's
convert_hf_to_gguf.py writes them (conversion/llama.py, qwen.py, base.py's TextModel).

Families: `llama` and `mistral` (both llama.cpp's `llama` architecture, Q and K rows
permuted: its `llama` graph applies rope to interleaved pairs, transformers to halves),
`qwen2` and `qwen3` (their own architectures, rope on halves: no permutation).

The tokenizer comes from tokenizer.json alone (no transformers, no sentencepiece): a
byte-fallback BPE (Llama 2, Mistral 7B) as `llama`, tokens scored by merge rank as
sentencepiece scores them; a byte-level BPE (Llama 3, Qwen, Mistral Nemo) as `gpt2`, `pre`
named by its regex (the converter hashes a sample's token ids against a table instead).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from lazymerge.errors import InputError
from lazymerge.meaning.gguf import (
    GEMMAS,
    NORM_EPS,
    arch_of,
    n_experts,
    phi3_rope,
    rope_params,
    sliding_layers,
)  # fmt: skip

# Byte-level pre-tokenizer regexes, as tokenizer.json spells them, and llama.cpp's name
# for each (llama-vocab.cpp keeps a hand-adapted copy of each regex under that name).
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
T = gguf.TokenType


def write_metadata(
    w: gguf.GGUFWriter,
    config: dict[str, Any],
    model_dir: Path,
    *,
    tokenizer: bool = True,
    name: str | None = None,
) -> None:
    """Every key llama.cpp reads but the file type and the tensors: general.*, the
    hyperparameters of `config` (the output's config.json), and (`tokenizer`) the
    tokenizer in `model_dir` (the base's).

    Example:
        >>> w = gguf.GGUFWriter(path, "llama")
        >>> write_metadata(w, config, base_dir, name="my-merge")
    """
    where = str(model_dir if model_dir.is_file() else model_dir / "config.json")
    arch = arch_of(config, where)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or model_dir.stem)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch in GEMMAS:
        _write_gemma(w, config, arch, where)
    elif arch == gguf.MODEL_ARCH.PHI3:
        _write_phi3(w, config, where)
    elif arch == gguf.MODEL_ARCH.COMMAND_R:
        _write_hparams(w, config, arch)
        _write_command_r(w, config)
    else:
        _write_hparams(w, config, arch)
        _write_rope(w, config, where)
    if tokenizer and model_dir.is_file():  # a GGUF base: its tokenizer keys as they are
        copy_tokenizer(w, model_dir, int(config["vocab_size"]))
    elif tokenizer:  # (Gemma's converter says no space prefix, Phi 3's nothing of it)
        space = "off" if arch in GEMMAS else "unsaid" if arch == gguf.MODEL_ARCH.PHI3 else "read"
        add_tokenizer(w, model_dir, int(config["vocab_size"]), space_prefix=space)


def _write_hparams(w: gguf.GGUFWriter, config: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
    """TextModel.set_gguf_parameters, and LlamaModel's additions, for our families."""
    n_head = int(config["num_attention_heads"])
    # (Command R's converter takes model_max_length first)
    n_ctx = config.get("max_position_embeddings")
    if arch == gguf.MODEL_ARCH.COMMAND_R and config.get("model_max_length") is not None:
        n_ctx = config["model_max_length"]
    _write_sizes(w, config, n_ctx)
    _write_norm_eps(w, config)
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    _write_experts(w, config)
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_rope_dimension_count(int(head_dim or int(config["hidden_size"]) // n_head))


def _write_sizes(w: gguf.GGUFWriter, config: dict[str, Any], n_ctx: Any) -> None:
    """Every family's shape keys: layers, context (`n_ctx`, when known), widths, heads."""
    n_head = int(config["num_attention_heads"])
    w.add_block_count(int(config["num_hidden_layers"]))
    if n_ctx is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))


def _write_phi3(w: gguf.GGUFWriter, config: dict[str, Any], where: str) -> None:
    """Phi3MiniModel's set_gguf_parameters (no generic keys), and a long-context model's
    attention factor (its rope factors are tensors: plan/gguf.py)."""
    rope = phi3_rope(config, where)
    _write_sizes(w, config, config["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(rope.original_context)
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_rope_dimension_count(rope.dims)
    w.add_rope_freq_base(float(rope_params(config)["rope_theta"] or 10000.0))
    w.add_sliding_window(int(config.get("sliding_window") or 0))
    if rope.attn_factor is not None:
        w.add_rope_scaling_attn_factors(rope.attn_factor)


def _write_norm_eps(w: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """RMSNorm's epsilon, or LayerNorm's (StarCoder2, Command R), as the config names it."""
    if config.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    eps = next((config[k] for k in NORM_EPS[1:] if config.get(k) is not None), None)
    if eps is not None:
        w.add_layer_norm_eps(float(eps))


def _write_command_r(w: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """CommandR2Model's: the rope base, no rope scaling, and its logit scale."""
    if (theta := rope_params(config)["rope_theta"]) is not None:
        w.add_rope_freq_base(float(theta))
    w.add_logit_scale(float(config.get("logit_scale", 0.0625)))
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _write_gemma(
    w: gguf.GGUFWriter, config: dict[str, Any], arch: gguf.MODEL_ARCH, where: str
) -> None:
    """Gemma2Model's and Gemma3Model's set_gguf_parameters (gemma2's without the generic
    keys: no rope base, which llama.cpp then takes as 10000, Gemma 2's)."""
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_head)
    _write_sizes(w, config, config["max_position_embeddings"])
    if arch == gguf.MODEL_ARCH.GEMMA3:
        _write_rope(w, config, where)
        if (swa_base := _swa_rope_theta(config)) is not None:
            w.add_rope_freq_base_swa(float(swa_base))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                     ("final_logit_softcapping", w.add_final_logit_softcapping)):  # fmt: skip
        if config.get(key):
            add(float(config[key]))
    if config.get("sliding_window") and config.get("sliding_window_pattern") != 1:
        w.add_sliding_window(int(config["sliding_window"]))
    if (slides := sliding_layers(arch, config)) is not None:
        w.add_sliding_window_pattern(slides)


def _swa_rope_theta(config: dict[str, Any]) -> float | None:
    """Gemma 3's local (sliding-window) rope base: transformers 5's sliding_attention
    rope_parameters, or 4's rope_local_base_freq."""
    params = config.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict) and local.get("rope_theta") is not None:
        return float(local["rope_theta"])
    base = config.get("rope_local_base_freq")
    return float(base) if base is not None else None


def _write_experts(w: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """A MoE's: expert count and used count (TextModel), the experts' and the shared
    expert's feed-forward lengths (Qwen2MoeModel); llama.cpp's graphs fix the rest."""
    if n_experts(config):
        w.add_expert_count(n_experts(config))
    if (used := config.get("num_experts_per_tok")) is not None:
        w.add_expert_used_count(int(used))
    if (n_ff := config.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(int(n_ff))
    if (shared := config.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(int(shared))


def _write_rope(w: gguf.GGUFWriter, config: dict[str, Any], where: str) -> None:
    rope = rope_params(config)
    if rope["rope_theta"] is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    kind, factor = rope["rope_type"], rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        optional = {
            "extrapolation_factor": w.add_rope_scaling_yarn_ext_factor,
            "attention_factor": w.add_rope_scaling_yarn_attn_factor,
            "beta_fast": w.add_rope_scaling_yarn_beta_fast,
            "beta_slow": w.add_rope_scaling_yarn_beta_slow,
        }
        for key, add in optional.items():
            if rope.get(key) is not None:
                add(float(rope[key]))
    elif kind not in ("default", "llama3"):  # llama3's is a tensor: rope_freqs
        raise InputError(
            f"{where}: rope_type {kind!r}: not supported yet in GGUF output "
            f"(lazymerge writes default, linear, yarn and llama3); write safetensors"
        )


def copy_tokenizer(w: gguf.GGUFWriter, path: Path, n_vocab: int) -> None:
    """The `tokenizer.*` keys of the GGUF at `path`, with their value types, as they are."""
    from lazymerge.read.gguf import read_gguf

    g = read_gguf(path)  # (a split GGUF's first file: the metadata)
    tokens = g.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise InputError(
            f"{path}: no tokenizer.ggml.tokens; pass --no-tokenizer to write the GGUF without "
            "a tokenizer (llama.cpp refuses those)"
        )
    if len(tokens) != n_vocab:
        raise InputError(
            f"{path}: {len(tokens)} tokens for {n_vocab} embedding rows; llama.cpp refuses that"
        )
    for key, field in g.fields.items():
        if key.startswith("tokenizer."):
            item = gguf.GGUFValueType(field.item_type) if field.item_type is not None else None
            w.add_key_value(key, field.value, gguf.GGUFValueType(field.vtype), sub_type=item)


def check_tokenizer(model_dir: Path, n_vocab: int) -> None:
    """Raise the InputError add_tokenizer would, before anything is written."""
    add_tokenizer(gguf.GGUFWriter(None, "llama"), model_dir, n_vocab)


def add_tokenizer(
    w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, space_prefix: str = "read"
) -> None:
    """The `tokenizer.*` keys for the Hugging Face tokenizer in `model_dir`, its token
    list padded to the model's `n_vocab` rows as the converter pads it; `space_prefix`:
    a sentencepiece-style tokenizer's add_space_prefix as the family's converter writes
    it: "read" from the tokenizer, "off" false, "unsaid" not at all."""
    data = _tokenizer_json(model_dir)
    path, model = model_dir / "tokenizer.json", data.get("model") or {}
    spm, byte_level = bool(model.get("byte_fallback")), _get(data, "decoder", "type") == "ByteLevel"
    if model.get("type") != "BPE" or not (spm or byte_level):
        raise InputError(
            f"{path}: a {model.get('type')} tokenizer; lazymerge writes byte-fallback and "
            f"byte-level BPE ones (Llama's, Mistral's, Qwen's) into a GGUF; pass --no-tokenizer "
            f"to write one without (llama.cpp refuses it) or write safetensors"
        )
    try:
        tokens, types = _token_list(data, n_vocab, path, spm)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise InputError(f"{path}: malformed ({e!r}); replace it with the base's") from None
    w.add_tokenizer_model("llama" if spm else "gpt2")
    w.add_tokenizer_pre("default" if spm else _pre_name(data, path))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_token_scores(_scores(tokens, types, model.get("merges") or []))
        prefix = _add_space_prefix(data, model_dir) if space_prefix == "read" else False
        if prefix is not None and space_prefix != "unsaid":
            w.add_add_space_prefix(prefix)
    # Merges, special token ids, add_bos/add_eos and the chat template, read by gguf-py
    # from tokenizer.json, tokenizer_config.json (or chat_template.jinja) and config.json.
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        what = "no tokenizer.json: copy the base's tokenizer files there"
        if (model_dir / "tokenizer.model").is_file():
            what = "tokenizer.model but no tokenizer.json, which lazymerge reads: write it with AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        raise InputError(
            f"{model_dir}: {what}, or pass --no-tokenizer to write the GGUF without a "
            f"tokenizer (llama.cpp refuses those)"
        )
    if (config := model_dir / "tokenizer_config.json").is_file():
        _read_json(config)  # gguf-py reads it too, and would fail less clearly
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix or replace it") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object; fix or replace it")
    return data


def _get(data: dict[str, Any], *keys: str) -> Any:
    """data[k1][k2]..., None where a level is missing or not an object."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None  # type: ignore[assignment]
    return data


def _token_list(
    data: dict[str, Any], n_vocab: int, path: Path, spm: bool
) -> tuple[list[str], list[int]]:
    """Every id's token text and type, added tokens included; ids the tokenizer leaves
    unused up to `n_vocab` as `[PADn]` (TextModel.get_vocab_base)."""
    added = data.get("added_tokens") or []
    pairs = [(int(i), str(tok)) for tok, i in data["model"]["vocab"].items()]
    ids = [i for i, _ in pairs] + [int(t["id"]) for t in added]
    if min(ids, default=0) < 0:
        raise ValueError(f"token id {min(ids)}")
    if (top := max(ids, default=-1)) >= n_vocab:
        raise InputError(
            f"{path}: token id {top} but config.json's vocab_size is {n_vocab}: the "
            f"tokenizer is not this model's; use the base's tokenizer files"
        )
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [int(T.UNUSED)] * n_vocab
    for i, tok in pairs:
        tokens[i] = tok
        types[i] = int(T.BYTE if spm and BYTE_TOKEN.fullmatch(tok) else T.NORMAL)
    for t in added:
        i, text = t["id"], t["content"]
        if t.get("special") or _looks_special(text):
            tokens[i], types[i] = text, int(T.CONTROL)
        else:  # llama.cpp matches user-defined tokens in raw text: pre-normalize spaces
            tokens[i], types[i] = (text.replace("▁", " ") if spm else text), int(T.USER_DEFINED)
    return tokens, types


def _looks_special(text: str) -> bool:
    """Unmarked tokens that ought to be control ones (TextModel.does_token_look_special)."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _scores(tokens: list[str], types: list[int], merges: list[Any]) -> list[float]:
    """sentencepiece-style scores: llama.cpp merges the adjacent pair whose join scores
    highest, so a token made by merge k scores -k-1 (the earliest merge making it)."""
    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, k)
    return [
        -1000.0 if ty == T.UNUSED else -float(rank[tok] + 1) if tok in rank else 0.0
        for tok, ty in zip(tokens, types, strict=True)
    ]


def _add_space_prefix(data: dict[str, Any], model_dir: Path) -> bool | None:
    """Whether a space is put before the text (llama.cpp's default for these: yes):
    tokenizer_config's add_prefix_space, as the converter reads it, else the Metaspace."""
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        value = _read_json(config_path).get("add_prefix_space")
        if isinstance(value, bool):
            return value
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "never":
        return False
    return None


def _pre_name(data: dict[str, Any], path: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level tokenizer's pre-tokenizer."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = SPLITS.get(str((parts[0].get("pattern") or {}).get("Regex")))
        if name == "llama-bpe" and not data["model"].get("ignore_merges"):
            return "smaug-bpe"  # Llama 3's regex, merges always applied
        if name is not None:
            return name
    raise InputError(
        f"{path}: a pre-tokenizer llama.cpp has no name lazymerge knows for (it knows "
        f"Llama 3's, Qwen2's, Tekken's and GPT-2's); write safetensors and convert them "
        f"with llama.cpp's convert_hf_to_gguf.py"
    )
