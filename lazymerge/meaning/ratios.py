"""The gradient's meaning: which fraction of `other` each tensor gets (DESIGN §2).
Pure functions of tensor names, rules and the layer count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lazymerge.meaning.layers import LayerStack, natural_key
from lazymerge.recipe.spec import GradientRule


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


def rule_ratio(rule: GradientRule, name: str, stack: LayerStack) -> float:
    """Ratio one rule gives a tensor: anchors inside its span of decoder layers, `rest`
    outside it (and outside the layers)."""
    start, end = rule.layers if rule.layers is not None else (0, stack.count)
    layer = stack.layer_of(name)
    if layer is None or not start <= layer < end:
        return rule.rest
    return anchor_ratio(rule.values, start, end, layer)


def first_rule(name: str, rules: Sequence[GradientRule]) -> int | None:
    """Index of the rule that decides tensor `name` (the first that matches), if any."""
    return next((i for i, rule in enumerate(rules) if rule.matches(name)), None)


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
    names: Sequence[str], rules: Sequence[GradientRule], stack: LayerStack
) -> dict[str, float]:
    """Every tensor's ratio. A tensor-mode rule needs them all: its anchors are spread
    over the tensors it decides, in natural order."""
    owner = {name: first_rule(name, rules) for name in names}
    out = {name: 0.0 for name in names}
    for i, rule in enumerate(rules):
        mine = [n for n in names if owner[n] == i]
        if rule.over == "tensors":
            mine.sort(key=lambda n: natural_key(n, stack, anchors=True))
            out.update(zip(mine, tensor_ratios(rule.values, len(mine)), strict=True))
        else:
            out.update((n, rule_ratio(rule, n, stack)) for n in mine)
    return out
