"""Where a tensor sits in the model: its decoder layer, and the model's natural order."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Hugging Face decoder layers: "model.layers.12.mlp.up_proj.weight" (Llama, Mistral, Qwen...).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# A Llama-family decoder layer's modules in the order the architecture (and so
# `state_dict()`) lists them; modules not named here follow, by name.
MODULE_ORDER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)  # fmt: skip


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor, or None for embeddings, final norm, lm_head."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_count(names: Iterable[str]) -> int:
    """Number of decoder layers, from the highest layer index in the tensor names."""
    layers = [i for i in map(layer_of, names) if i is not None]
    return max(layers) + 1 if layers else 0


def natural_key(name: str) -> tuple[int, int, int, list[str | int]]:
    """The model's natural order, also the output's: embeddings, each layer in number
    order with its modules in architecture order (weight before bias), the final norm,
    lm_head. Names are compared with their numbers as numbers (h.2 before h.10), so the
    order never depends on the input format's."""
    layer = layer_of(name)
    if layer is not None:
        module = _LAYER.split(name, maxsplit=1)[-1]
        rank = next(
            (i for i, m in enumerate(MODULE_ORDER) if module.startswith(m + ".")), len(MODULE_ORDER)
        )
        return (1, layer, rank, _digits(module.replace(".weight", ".0").replace(".bias", ".1")))
    section = 0 if "embed" in name or ".wte." in name else 3 if "lm_head" in name else 2
    return (section, 0, 0, _digits(name))


def _digits(text: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
