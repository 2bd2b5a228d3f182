"""Adapter module names -> checkpoint names: one known mapping, whole, or none."""

from __future__ import annotations

from lazymerge.meaning.names import LLAVA, MAPPINGS, fitting_mapping, rename

STORED = {
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.1.mlp.down_proj.weight",
    "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    "multi_modal_projector.mm_input_projection_weight",
}


def test_names_that_match_need_no_mapping() -> None:
    assert fitting_mapping(sorted(STORED), STORED) == ()


def test_an_adapter_in_memory_names_fits_a_checkpoint_as_stored() -> None:
    targets = [
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    ]
    assert fitting_mapping(targets, STORED) == LLAVA
    assert [rename(t, LLAVA) for t in targets] == [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    ]


def test_an_older_adapter_fits_a_checkpoint_saved_in_memory_names() -> None:
    memory_names = {rename(n, MAPPINGS[1]) for n in STORED}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in memory_names
    assert fitting_mapping(sorted(STORED), memory_names) == MAPPINGS[1]


def test_a_partial_fit_is_no_fit() -> None:
    targets = [
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.9.self_attn.q_proj.weight",  # no layer 9 anywhere
    ]
    assert fitting_mapping(targets, STORED) is None
