"""Adapter module names -> the names a checkpoint stores.

PEFT names an adapter's tensors after the model's modules in memory; transformers may
store the same weights under other names. The multimodal families transformers maps as
`llava` (LLaVA, Gemma 3, Mistral 3, PaliGemma, Aya Vision, InternVL...: its
conversion_mapping.py) keep their language model at `model.language_model.*` in memory and
at `language_model.model.*` in their checkpoints, so a LoRA trained on Gemma 3 names
`model.language_model.layers.0...` where the file has `language_model.model.layers.0...`.

An adapter is renamed only when one known mapping, applied to every one of its targets,
makes them all name tensors the checkpoint has: never a partial or a guessed match.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

# (in memory, as stored) prefix pairs, one tuple per family; longest prefixes first.
LLAVA = (
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.", "vision_tower."),
    ("lm_head.", "language_model.lm_head."),
)
MAPPINGS: tuple[tuple[tuple[str, str], ...], ...] = (
    LLAVA,  # an adapter in memory names, a checkpoint as transformers stores it
    tuple((b, a) for a, b in LLAVA),  # an older adapter, a checkpoint saved in memory names
)
Mapping = tuple[tuple[str, str], ...]


def rename(name: str, mapping: Mapping) -> str:
    """`name` with the first prefix of `mapping` it starts with replaced."""
    for old, new in mapping:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def fitting_mapping(targets: Sequence[str], present: Collection[str]) -> Mapping | None:
    """The known mapping under which every target names a tensor in `present`: () when
    they already all do, None when no mapping (or more than one, differently) fits."""
    if all(t in present for t in targets):
        return ()
    fits = [m for m in MAPPINGS if all(rename(t, m) in present for t in targets)]
    results = {tuple(rename(t, m) for t in targets) for m in fits}
    return fits[0] if len(results) == 1 else None


def describe(mapping: Mapping) -> str:
    """`a.* -> b.*, ...` for the prefixes of `mapping`."""
    return ", ".join(f"{old}* -> {new}*" for old, new in mapping)
