"""The blend's meaning: which fraction of `other` each tensor gets (DESIGN §2)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Hugging Face decoder layers: "model.layers.12.mlp.up_proj.weight" (Llama, Mistral, Qwen...).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class GradientRule:
    """One gradient: anchors over a span of decoder layers, `rest` everywhere else.

    `layers` is the half-open span [start, end); None means every layer of the model.
    `filter`, when set, limits the rule to tensors whose name contains it.
    """

    values: tuple[float, ...]
    layers: tuple[int, int] | None = None
    rest: float = 0.0
    filter: str | None = None

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


def ratio_for(name: str, rules: Sequence[GradientRule], n_layers: int) -> float:
    """Fraction of `other` in tensor `name`: the first matching rule decides, else 0."""
    i = first_rule(name, rules)
    return 0.0 if i is None else rule_ratio(rules[i], name, n_layers)
