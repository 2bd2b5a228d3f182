"""A modular architecture's modules (mergekit's modular architectures: a vision-language
model's text decoder, vision tower and projector), and which module each tensor of a
checkpoint belongs to.

mergekit lists every tensor of a module by name, from a JSON per architecture
(`mergekit/_data/architectures/gemma3vl.json`, `mistral3.json`), and drops anything it
does not list. Here
a module owns the tensors under its prefixes (the longest matching prefix wins), so a
checkpoint in the Hub's layout (`vision_tower.vision_model.*`, mergekit's names) and one
transformers 5 saved (`vision_tower.*`) are both read, and the output keeps the input's
names; a tensor no module claims is refused rather than dropped. Each module's layers
are its one numbered stack (`<prefix>.<n>.*`), counted in config.json at `count_key`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lazymerge.errors import InputError
from lazymerge.meaning.layers import LayerStack, numbered_stacks


@dataclass(frozen=True)
class ModuleDef:
    """One module of an architecture, by mergekit's key for it."""

    name: str  # mergekit's module key: text_decoder, vision_tower, multi_modal_projector
    prefixes: tuple[str, ...]  # the names it owns start so (each layout's spelling)
    count_key: str | None  # its layer count in config.json, dotted; None: no layers
    # Name endings of its tensors after its layers (merged from the last slice's
    # sources, as mergekit's post_weights); the rest outside the layers come before them.
    post: tuple[str, ...] = ()


# By config.json's architectures[0], as mergekit picks its JSON; modules in its JSON's
# order. Gemma 3 (mergekit's gemma3vl.json): the text decoder in the Hub's layout
# (`language_model.model.*`, which transformers 5 still saves) or the module tree's
# (`model.language_model.*`); the SigLIP tower as the Hub (`vision_tower.vision_model.*`)
# or transformers 5 (`vision_tower.*`) saves it. Mistral 3 (mergekit's mistral3.json):
# the Hub and transformers 5 save the same names (`language_model.model.*`,
# `language_model.lm_head.weight`, `vision_tower.transformer.layers.*`), the module tree
# spells them `model.language_model.*`, `lm_head.*`...; its Pixtral tower has nothing
# after its layers (patch_conv and ln_pre come before), its projector no layers.
# Gemma 3 and Mistral 3 name their text decoder, projector and vision tower alike (llava's
# layout): the tower differs only in what follows its layers.
_TEXT = ModuleDef(
    "text_decoder",
    ("language_model.", "model.language_model.", "lm_head."),
    "text_config.num_hidden_layers",
    (".norm.weight", "lm_head.weight"),
)
_PROJECTOR = ModuleDef(
    "multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector."), None
)
_TOWER = ("vision_tower.", "model.vision_tower."), "vision_config.num_hidden_layers"
MODULES: dict[str, tuple[ModuleDef, ...]] = {
    "Gemma3ForConditionalGeneration": (
        _TEXT,
        _PROJECTOR,
        ModuleDef("vision_tower", *_TOWER, ("post_layernorm.weight", "post_layernorm.bias")),
    ),
    "Mistral3ForConditionalGeneration": (_TEXT, _PROJECTOR, ModuleDef("vision_tower", *_TOWER)),
}


# mergekit's modular architectures with no table here: mergekit gives each module's
# layers positions t of their own, a plain models: merge here gives a tower's layers t = 0
# (plan/nmodel.py refuses a parameter that varies over them).
UNPLACED = frozenset({
    "Llama4ForConditionalGeneration", "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
})  # fmt: skip


def arch_name(config: Mapping[str, Any] | None) -> str | None:
    """config.json's architectures[0] (None: it names none)."""
    names = (config or {}).get("architectures")
    return str(names[0]) if isinstance(names, list) and names else None


def modules_of(config: Mapping[str, Any] | None) -> tuple[ModuleDef, ...] | None:
    """The modules of the architecture config.json names (None: not a modular one)."""
    name = arch_name(config)
    return MODULES.get(name) if name is not None else None


def architecture(config: Mapping[str, Any] | None) -> str:
    """config.json's architectures[0], for messages."""
    return arch_name(config) or "no architectures in config.json"


@dataclass(frozen=True)
class Module:
    """One module as a checkpoint holds it: its tensors, its layers among them."""

    spec: ModuleDef
    names: tuple[str, ...]
    stack: LayerStack  # prefix None: no layers

    def is_post(self, name: str) -> bool:
        """A tensor after the module's layers (its final norm, an output head)."""
        return self.stack.layer_of(name) is None and name.endswith(self.spec.post)


def split(names: Iterable[str], defs: tuple[ModuleDef, ...], where: str) -> dict[str, Module]:
    """Every tensor name of checkpoint `where` in its module; each module's layers. A
    tensor no module claims is an InputError (mergekit would leave it out, silently)."""
    owned: dict[str, list[str]] = {d.name: [] for d in defs}
    for name in names:
        owner = module_of(name, defs)
        if owner is None:
            listing = ", ".join(f"{d.name} ({' '.join(d.prefixes)})" for d in defs)
            raise InputError(
                f"{where}: {name} is in none of the architecture's modules: {listing}; "
                "mergekit would leave it out of the output"
            )
        owned[owner.name].append(name)
    return {d.name: Module(d, tuple(owned[d.name]), _stack(d, owned[d.name], where)) for d in defs}


def module_of(name: str, defs: tuple[ModuleDef, ...]) -> ModuleDef | None:
    """The module owning tensor `name`: the longest of the prefixes it starts with."""
    best: tuple[int, ModuleDef | None] = (0, None)
    for d in defs:
        for prefix in d.prefixes:
            if name.startswith(prefix) and len(prefix) > best[0]:
                best = (len(prefix), d)
    return best[1]


def _stack(d: ModuleDef, names: list[str], where: str) -> LayerStack:
    """A module's one numbered stack; none for a module without layers (its numbered
    names, if any, are not layers)."""
    stacks = numbered_stacks(names) if d.count_key is not None else {}
    if len(stacks) > 1:
        listing = ", ".join(f"{p} ({n})" for p, n in sorted(stacks.items()))
        raise InputError(f"{where}: module {d.name} has more than one stack of layers: {listing}")
    if not stacks:
        return LayerStack(None, 0)
    (prefix, count), *_ = stacks.items()
    return LayerStack(prefix, count)
