"""The model's natural order, family by family: `model.state_dict()`'s order, as the
checkpoint names its tensors. It is the output's order and the order tensor-mode
gradients (BlockMerge_Gradient_Tensors) spread their anchors over.

state_dict() lists a module's own parameters (weight before bias), then its children in
the order `__init__` assigns them; so each table below is read from transformers'
modeling code (the classes named beside it), as data: the modules before the decoder
layers, one layer's modules, the modules after them. A `*` is a block number (a layer of a
tower, an expert): blocks go in number order, each block's modules together. Modules
before and after the layers are matched as the end of a tensor's module path, so a
checkpoint saved with or without the base model's prefix (`transformer.h` or `h`,
Gemma 3's `language_model.model` or `model.language_model`) is ordered alike; a layer's
modules are matched from the layer on.

Mixture-of-experts models keep their experts fused in memory (`experts.gate_up_proj`);
transformers saves most families' per expert, and those saved names are what is ordered:
expert 0's gate, up and down projections, then expert 1's. gpt-oss's are saved fused, the
experts module's own parameters, in the order its class assigns them (EXPERT_PARAMS).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

Key = tuple[int, ...]


@dataclass(frozen=True)
class Table:
    """One family's state_dict() order: module paths, `*` for a block number."""

    source: str  # the transformers classes it is read from
    pre: tuple[str, ...]  # before the decoder layers
    layer: tuple[str, ...]  # one decoder layer, after `<stack>.<n>.`
    post: tuple[str, ...]  # after them


@dataclass(frozen=True)
class Order:
    """The model's family (config.json `model_type`) and its table (None: not known)."""

    model_type: str | None
    table: Table | None


ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
QK_NORM = (*ATTENTION, "self_attn.q_norm", "self_attn.k_norm")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
GEMMA_NORMS = (*NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")
# Per-expert saved names; a MoE model's dense layers (mlp_only_layers) hold MLP instead.
EXPERTS = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj")
HEAD = ("norm", "lm_head")
# The own parameters of transformers' fused experts classes (GptOssExperts), as assigned.
EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
LLAMA = Table(
    "LlamaForCausalLM, LlamaDecoderLayer", ("embed_tokens",), (*ATTENTION, *MLP, *NORMS), HEAD
)
GEMMA3_TEXT = Table(
    "Gemma3ForCausalLM, Gemma3DecoderLayer, Gemma3Attention", ("embed_tokens",),
    (*QK_NORM, *MLP, *GEMMA_NORMS), HEAD,
)  # fmt: skip
# Gemma 3's SigLIP tower (SiglipVisionTransformer, SiglipEncoderLayer, SiglipAttention
# -- k before q --, SiglipMultiheadAttentionPoolingHead), then Gemma3MultiModalProjector
# (its own parameter, then its norm), then the language model.
SIGLIP = (
    "embeddings.patch_embedding", "embeddings.position_embedding",
    "encoder.layers.*.layer_norm1", "encoder.layers.*.self_attn.k_proj",
    "encoder.layers.*.self_attn.v_proj", "encoder.layers.*.self_attn.q_proj",
    "encoder.layers.*.self_attn.out_proj", "encoder.layers.*.layer_norm2",
    "encoder.layers.*.mlp.fc1", "encoder.layers.*.mlp.fc2", "post_layernorm",
    "head", "head.attention", "head.attention.out_proj", "head.layernorm", "head.mlp.fc1",
    "head.mlp.fc2",
)  # fmt: skip
# Pixtral's tower (PixtralVisionModel, PixtralTransformer, PixtralAttentionLayer): its
# feed-forward before its attention, k/v/q before o.
PIXTRAL = (
    "patch_conv", "ln_pre", "transformer.layers.*.attention_norm",
    "transformer.layers.*.feed_forward.gate_proj", "transformer.layers.*.feed_forward.up_proj",
    "transformer.layers.*.feed_forward.down_proj", "transformer.layers.*.attention.k_proj",
    "transformer.layers.*.attention.v_proj", "transformer.layers.*.attention.q_proj",
    "transformer.layers.*.attention.o_proj", "transformer.layers.*.ffn_norm",
)  # fmt: skip
TABLES = {
    "llama": LLAMA,
    "mistral": Table("MistralForCausalLM, MistralDecoderLayer", LLAMA.pre, LLAMA.layer, HEAD),
    "qwen2": Table("Qwen2ForCausalLM, Qwen2DecoderLayer", LLAMA.pre, LLAMA.layer, HEAD),
    "qwen3": Table(
        "Qwen3ForCausalLM, Qwen3DecoderLayer, Qwen3Attention", LLAMA.pre,
        (*QK_NORM, *MLP, *NORMS), HEAD,
    ),
    "gemma2": Table(
        "Gemma2ForCausalLM, Gemma2DecoderLayer", LLAMA.pre, (*ATTENTION, *MLP, *GEMMA_NORMS), HEAD
    ),
    "gemma3_text": GEMMA3_TEXT,
    "gemma3": Table(
        "Gemma3ForConditionalGeneration, Gemma3Model; " + GEMMA3_TEXT.source,
        (*SIGLIP, "multi_modal_projector", "multi_modal_projector.mm_soft_emb_norm",
         "embed_tokens"),
        GEMMA3_TEXT.layer, HEAD,
    ),
    "mistral3": Table(
        "Mistral3ForConditionalGeneration, Mistral3Model, Mistral3MultiModalProjector, "
        "PixtralVisionModel; MistralDecoderLayer",
        (*PIXTRAL, "multi_modal_projector.norm", "multi_modal_projector.patch_merger.merging_layer",
         "multi_modal_projector.linear_1", "multi_modal_projector.linear_2", "embed_tokens"),
        LLAMA.layer, HEAD,
    ),
    # o_proj is assigned before the fused qkv_proj.
    "phi3": Table(
        "Phi3ForCausalLM, Phi3DecoderLayer, Phi3Attention, Phi3MLP", LLAMA.pre,
        ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj", *NORMS),
        HEAD,
    ),
    # Saved under the older block_sparse_moe names: w1 (gate), w3 (up), w2 (down).
    "mixtral": Table(
        "MixtralForCausalLM, MixtralDecoderLayer, MixtralSparseMoeBlock, MixtralExperts",
        LLAMA.pre,
        (*ATTENTION, "block_sparse_moe.gate", "block_sparse_moe.experts.*.w1",
         "block_sparse_moe.experts.*.w3", "block_sparse_moe.experts.*.w2", *NORMS),
        HEAD,
    ),
    "qwen2_moe": Table(
        "Qwen2MoeForCausalLM, Qwen2MoeDecoderLayer, Qwen2MoeSparseMoeBlock", LLAMA.pre,
        (*ATTENTION, "mlp.gate", *EXPERTS, "mlp.shared_expert.gate_proj",
         "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj", "mlp.shared_expert_gate",
         *MLP, *NORMS),
        HEAD,
    ),
    # Qwen3MoeSparseMoeBlock assigns its experts before its router.
    "qwen3_moe": Table(
        "Qwen3MoeForCausalLM, Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock", LLAMA.pre,
        (*QK_NORM, *EXPERTS, "mlp.gate", *MLP, *NORMS), HEAD,
    ),
    # Norms after attention and MLP, none before.
    "olmo2": Table(
        "Olmo2ForCausalLM, Olmo2DecoderLayer, Olmo2Attention", LLAMA.pre,
        (*QK_NORM, *MLP, "post_attention_layernorm", "post_feedforward_layernorm"), HEAD,
    ),
    # The attention's own sinks before its projections; the router, then the experts,
    # saved fused (EXPERT_PARAMS).
    "gpt_oss": Table(
        "GptOssForCausalLM, GptOssDecoderLayer, GptOssAttention, GptOssMLP, GptOssExperts",
        LLAMA.pre, ("self_attn", *ATTENTION, "mlp.router", "mlp.experts", *NORMS), HEAD,
    ),
    "starcoder2": Table(
        "Starcoder2ForCausalLM, Starcoder2DecoderLayer, Starcoder2MLP", LLAMA.pre,
        (*ATTENTION, "mlp.c_fc", "mlp.c_proj", *NORMS), HEAD,
    ),
    # One LayerNorm a layer; q/k_norm with use_qk_norm.
    "cohere": Table(
        "CohereForCausalLM, CohereDecoderLayer, CohereAttention", LLAMA.pre,
        (*QK_NORM, *MLP, "input_layernorm"), HEAD,
    ),
    # `attn` holds the causal-mask buffers (attn.bias, attn.masked_bias) older checkpoints
    # saved, registered before c_attn.
    "gpt2": Table(
        "GPT2LMHeadModel, GPT2Model, GPT2Block, GPT2Attention, GPT2MLP", ("wte", "wpe"),
        ("ln_1", "attn", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"),
        ("ln_f", "lm_head"),
    ),
    # Sequential layers assign post_attention_layernorm before input_layernorm; parallel
    # ones have input_layernorm alone, or ln_attn and ln_mlp (new_decoder_architecture).
    "falcon": Table(
        "FalconForCausalLM, FalconModel, FalconDecoderLayer", ("word_embeddings",),
        ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
         "mlp.dense_4h_to_h", "post_attention_layernorm", "input_layernorm", "ln_attn", "ln_mlp"),
        ("ln_f", "lm_head"),
    ),
    "gpt_neox": Table(
        "GPTNeoXForCausalLM, GPTNeoXModel, GPTNeoXLayer", ("embed_in",),
        (*NORMS, "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
         "mlp.dense_4h_to_h"),
        ("final_layer_norm", "embed_out"),
    ),
}  # fmt: skip


def order_of(config: Mapping[str, Any] | None) -> Order:
    """The natural order of the model whose config.json is `config` (None: none)."""
    model_type = config.get("model_type") if config is not None else None
    if not isinstance(model_type, str):
        return Order(None, None)
    return Order(model_type, TABLES.get(model_type))


def rank(templates: tuple[str, ...], path: str, *, whole: bool) -> Key | None:
    """Where module `path` sits among `templates` (None: in none). `whole`: the path is
    the template; else the path ends with it. Each block number counts after the first
    template of its block, so a block's modules stay together."""
    for i, (pattern, heads) in enumerate(_compiled(templates, whole)):
        m = pattern.search(path)
        if m is not None:
            numbers = [int(n) for n in m.groups()]
            return (*(x for pair in zip(heads, numbers, strict=True) for x in pair), i)
    return None


@cache
def _compiled(templates: tuple[str, ...], whole: bool) -> list[tuple[re.Pattern[str], Key]]:
    out = []
    for template in templates:
        parts = template.split("*")
        body = r"(\d+)".join(re.escape(p) for p in parts)
        pattern = re.compile(("^" if whole else r"(?:^|\.)") + body + "$")
        # A block's first template: the first one that starts as this one does up to
        # each `*`.
        stems = ["*".join(parts[: k + 1]) for k in range(len(parts) - 1)]
        heads = tuple(next(j for j, t in enumerate(templates) if t.startswith(s)) for s in stems)
        out.append((pattern, heads))
    return out


def param_key(param: str) -> list[str | int]:
    """A module's own parameters: weights, then biases, then any other, by name; a fused
    experts module's in its class's order."""
    if param in EXPERT_PARAMS:
        return [-1, EXPERT_PARAMS.index(param)]
    kind = 0 if param.endswith("weight") else 1 if param.endswith("bias") else 2
    return [kind, param]
