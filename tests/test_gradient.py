from __future__ import annotations

import numpy as np
import pytest

from lazymerge.meaning.layers import LayerStack, find_stack
from lazymerge.meaning.ratios import all_ratios, anchor_ratio
from lazymerge.recipe import GradientRule


def ratio_for(name: str, rules: list[GradientRule], n_layers: int) -> float:
    """One tensor's ratio through the function the planner uses."""
    return all_ratios([name], rules, LayerStack("model.layers", n_layers))[name]


def test_two_anchors_are_linspace() -> None:
    expected = np.linspace(0.9, 0.0, 25)
    got = [anchor_ratio([0.9, 0.0], 0, 25, i) for i in range(25)]
    assert got == pytest.approx(expected.tolist(), abs=1e-15)


def test_two_anchors_are_linspace_inside_an_offset_span() -> None:
    expected = np.linspace(0.2, 0.8, 7)
    got = [anchor_ratio([0.2, 0.8], 10, 17, i) for i in range(10, 17)]
    assert got == pytest.approx(expected.tolist(), abs=1e-15)


def test_many_anchors_are_piecewise_linear() -> None:
    # Anchors 0, 1, 0 over 5 layers sit at layers 0, 2, 4; the layers between are midpoints.
    got = [anchor_ratio([0.0, 1.0, 0.0], 0, 5, i) for i in range(5)]
    assert got == [0.0, 0.5, 1.0, 0.5, 0.0]
    # Four anchors over 7 layers: anchor positions at layers 0, 2, 4, 6.
    got = [anchor_ratio([0.1, 0.7, 0.3, 0.9], 0, 7, i) for i in range(7)]
    assert got == pytest.approx([0.1, 0.4, 0.7, 0.5, 0.3, 0.6, 0.9])


def test_span_of_one_layer_gets_the_first_anchor() -> None:
    assert anchor_ratio([0.4, 0.9], 3, 4, 3) == 0.4


def test_span_of_two_layers_gets_the_end_anchors() -> None:
    assert [anchor_ratio([0.4, 0.9], 3, 5, i) for i in (3, 4)] == [0.4, 0.9]


def test_rest_outside_the_span_and_outside_the_layers() -> None:
    rule = GradientRule(values=(0.9, 0.0), layers=(2, 6), rest=0.25)
    assert ratio_for("model.layers.1.mlp.up_proj.weight", [rule], 8) == 0.25
    assert ratio_for("model.layers.6.mlp.up_proj.weight", [rule], 8) == 0.25
    assert ratio_for("model.layers.2.mlp.up_proj.weight", [rule], 8) == 0.9
    assert ratio_for("model.embed_tokens.weight", [rule], 8) == 0.25
    assert ratio_for("lm_head.weight", [rule], 8) == 0.25


def test_default_span_is_every_layer() -> None:
    rule = GradientRule(values=(1.0, 0.0))
    ratios = [ratio_for(f"model.layers.{i}.self_attn.q_proj.weight", [rule], 5) for i in range(5)]
    assert ratios == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_first_matching_rule_wins_and_unmatched_tensors_keep_the_base() -> None:
    rules = [
        GradientRule(values=(0.8,), filter="self_attn"),
        GradientRule(values=(0.3,), filter="mlp"),
    ]
    assert ratio_for("model.layers.0.self_attn.q_proj.weight", rules, 2) == 0.8
    assert ratio_for("model.layers.0.mlp.down_proj.weight", rules, 2) == 0.3
    assert ratio_for("model.layers.0.input_layernorm.weight", rules, 2) == 0.0


def test_layer_of_and_layer_count() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.39.b", "lm_head.weight"]
    stack = find_stack(names, "m")
    layer_of = stack.layer_of
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("model.norm.weight") is None
    assert layer_of("model.notlayers.3.x") is None
    assert stack.count == 40
    assert find_stack(["lm_head.weight"], "m").count == 0
