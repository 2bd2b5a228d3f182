"""The blend's meaning: which fraction of `other` each tensor gets (DESIGN §2)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Hugging Face decoder layers: "model.layers.12.mlp.up_proj.weight" (Llama, Mistral, Qwen...).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# A Llama-family decoder layer's modules in the order the architecture (and so
# `state_dict()`) lists them; modules not named here follow, by name.
MODULE_ORDER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)  # fmt: skip


@dataclass(frozen=True)
class GradientRule:
    """One gradient: anchors over a span of decoder layers, `rest` everywhere else.

    `layers` is the half-open span [start, end); None means every layer of the model.
    `filter`, when set, limits the rule to tensors whose name contains it. With
    `over="tensors"` the anchors are spread over the tensors themselves (layers and rest
    do not apply), as BlockMerge_Gradient_Tensors does.
    """

    values: tuple[float, ...]
    layers: tuple[int, int] | None = None
    rest: float = 0.0
    filter: str | None = None
    over: str = "layers"  # or "tensors": anchors spread over the tensors the rule decides

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter in name


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor, or None for embeddings, final norm, lm_head."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_count(names: Iterable[str]) -> int:
    """Number of decoder layers, from the highest layer index in the tensor names."""
    layers = [i for i in map(layer_of, names) if i is not None]
    return max(layers) + 1 if layers else 0


def anchor_ratio(values: Sequence[float], start: int, end: int, layer: int) -> float:
    """BlockMerge_Gradient's ratio for `layer` in the span [start, end) (caller checks span).

    The anchors are spread evenly over the span and linearly interpolated between; with
    two anchors this is exactly `np.linspace(v0, v1, end - start)[layer - start]`.
    """
    if end - start == 1:
        return float(values[0])
    k = len(values) - 1
    x = (layer - start) / (end - start - 1) * k
    return float(np.interp(x, range(k + 1), values))


def rule_ratio(rule: GradientRule, name: str, n_layers: int) -> float:
    """Ratio one rule gives a tensor: anchors inside its span, `rest` outside it."""
    start, end = rule.layers if rule.layers is not None else (0, n_layers)
    layer = layer_of(name)
    if layer is None or not start <= layer < end:
        return rule.rest
    return anchor_ratio(rule.values, start, end, layer)


def first_rule(name: str, rules: Sequence[GradientRule]) -> int | None:
    """Index of the rule that decides tensor `name` (the first that matches), if any."""
    return next((i for i, rule in enumerate(rules) if rule.matches(name)), None)


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


def tensor_ratios(values: Sequence[float], n: int) -> list[float]:
    """BlockMerge_Gradient_Tensors' arithmetic: n // sections tensors per section, each
    section a `linspace` between its two anchors, the remainder at the last anchor."""
    if len(values) == 1:
        return [float(values[0])] * n
    sections = len(values) - 1
    per = n // sections
    out = [float(v) for i in range(sections) for v in np.linspace(values[i], values[i + 1], per)]
    return out + [float(values[-1])] * (n - len(out))


def all_ratios(
    names: Sequence[str], rules: Sequence[GradientRule], n_layers: int
) -> dict[str, float]:
    """Every tensor's ratio. A tensor-mode rule needs them all: its anchors are spread
    over the tensors it decides, in natural order."""
    owner = {name: first_rule(name, rules) for name in names}
    out = {name: 0.0 for name in names}
    for i, rule in enumerate(rules):
        mine = [n for n in names if owner[n] == i]
        if rule.over == "tensors":
            mine.sort(key=natural_key)
            out.update(zip(mine, tensor_ratios(rule.values, len(mine)), strict=True))
        else:
            out.update((n, rule_ratio(rule, n, n_layers)) for n in mine)
    return out
