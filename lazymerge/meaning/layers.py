"""Where a tensor sits in the model: which stack of numbered blocks holds the decoder
layers, a tensor's layer in it, and the model's natural order.

The stack is decided, never guessed: among the numbered stacks a checkpoint holds
(`<prefix>.<n>.<rest>`), the decoder's is the one whose prefix is a known decoder stack
of the families transformers ships. Other stacks (a multimodal model's vision or audio
tower) are not decoder layers. Two known stacks, or only unknown ones, is an error that
names them and the recipe key that settles it (`layers_prefix`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.order import Key, Order, param_key, rank

# Decoder stacks as checkpoints name them (the prefix before the layer number): Llama,
# Mistral, Qwen, Gemma, Phi-3, Mixtral, OLMo, Cohere...; GPT-2, Falcon, BLOOM, GPT-J and
# StarCoder (`transformer.h`, or `h` in checkpoints saved without the base model's
# prefix); GPT-NeoX/Pythia; OPT; Mamba; MPT; and multimodal language models as older
# (`language_model.model.layers`) and newer (`model.language_model.layers`) transformers
# save them.
DECODER_STACKS = frozenset({
    "model.layers", "layers",
    "transformer.h", "h",
    "gpt_neox.layers",
    "model.decoder.layers", "decoder.layers",
    "backbone.layers",
    "transformer.blocks",
    "language_model.model.layers", "model.language_model.layers", "language_model.layers",
})  # fmt: skip
# The first `.<number>.` of a name: what comes before it is the stack's prefix.
_NUMBERED = re.compile(r"^(?P<prefix>.+?)\.(?P<n>\d+)\.")
# A Llama decoder layer's modules in state_dict() order, for a model whose family is not
# told (meaning/order.py has each family's); modules not named here follow, by name.
MODULE_ORDER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)  # fmt: skip


@dataclass(frozen=True)
class LayerStack:
    """The decoder's layers: their prefix (None: the model has none) and count, the
    other numbered stacks, which are not decoder layers (vision/audio towers), and the
    model's natural order (None: not told; the plan tells it from config.json)."""

    prefix: str | None
    count: int
    towers: tuple[str, ...] = ()
    order: Order | None = None

    def layer_of(self, name: str) -> int | None:
        """Decoder layer index of a tensor, or None (embeddings, final norm, lm_head,
        a tower's blocks)."""
        m = _NUMBERED.match(name)
        return int(m["n"]) if m is not None and m["prefix"] == self.prefix else None

    def describe(self) -> str:
        """For `plan` and `inspect`: the stack used, and the stacks left out."""
        if self.prefix is None:
            return "decoder layers: none"
        text = f"decoder layers: {self.prefix}.0-{self.count - 1} ({self.count})"
        if self.towers:
            text += "; not decoder layers: " + ", ".join(self.towers)
        return text


def numbered_stacks(names: Iterable[str]) -> dict[str, int]:
    """Every stack of numbered blocks in `names`: prefix -> block count (highest + 1)."""
    stacks: dict[str, int] = {}
    for name in names:
        m = _NUMBERED.match(name)
        if m is not None:
            stacks[m["prefix"]] = max(stacks.get(m["prefix"], 0), int(m["n"]) + 1)
    return stacks


def find_stack(names: Iterable[str], where: str, explicit: str | None = None) -> LayerStack:
    """The decoder layer stack of the checkpoint `where` whose tensors are `names`;
    `explicit` (the recipe's `layers_prefix`) settles it when given."""
    stacks = numbered_stacks(names)
    if explicit is not None:
        if explicit not in stacks:
            found = ", ".join(sorted(stacks)) or "none"
            raise RecipeError(
                f"layers_prefix {explicit!r}: {where} has no tensor <prefix>.<n>.* under it "
                f"(numbered stacks there: {found})"
            )
        return _stack(explicit, stacks)
    known = sorted(p for p in stacks if p in DECODER_STACKS)
    if len(known) == 1:
        return _stack(known[0], stacks)
    if not stacks:
        return LayerStack(None, 0)
    listing = ", ".join(f"{p} ({n})" for p, n in sorted(stacks.items()))
    what = "two decoder layer stacks" if known else "no known decoder layer stack"
    raise InputError(
        f"{where}: {what} among its numbered stacks: {listing}; name the decoder's in the "
        "recipe, e.g. layers_prefix: " + (known[0] if known else next(iter(sorted(stacks))))
    )


def _stack(prefix: str, stacks: dict[str, int]) -> LayerStack:
    towers = tuple(sorted(p for p in stacks if p != prefix))
    return LayerStack(prefix, stacks[prefix], towers)


def natural_key(
    name: str, stack: LayerStack | None = None, *, anchors: bool = False
) -> tuple[int, int, Key, list[str | int]]:
    """The model's natural order, also the output's: `state_dict()`'s, from the family's
    table (meaning/order.py) -- what comes before the decoder layers, each layer in number
    order with its modules in architecture order (weight before bias), what comes after.
    Names are compared with their numbers as numbers (h.2 before h.10), so the order never
    depends on the input format's. A tensor the table does not name goes, by name, after
    its layer's modules, after the embeddings (an `embed`/`wte.` name), before the head
    (a `lm_head` name after it), or else among the rest, between the layers and what
    follows them. A family without a table keeps the Llama order (MODULE_ORDER).

    `anchors`: the order is for a tensor-mode gradient's anchors, which must not land by
    a guess -- an unknown family or a tensor its table does not name is a RecipeError.
    Without a stack, the stack is found from the name alone (the known decoder prefixes).
    """
    order = stack.order if stack is not None else None
    if order is None or order.table is None:
        if anchors and order is not None:
            raise RecipeError(
                f"over: tensors: lazymerge has no natural order for model_type "
                f"{order.model_type!r}, so the anchors would land in an arbitrary order; "
                "use over: layers"
            )
        return _llama_key(name, stack)
    return _table_key(name, stack, order, anchors)


def _table_key(
    name: str, stack: LayerStack | None, order: Order, anchors: bool
) -> tuple[int, int, Key, list[str | int]]:
    """natural_key from the family's table (see there)."""
    assert order.table is not None  # natural_key sends only ordered families here
    table = order.table
    layer = _layer(name, stack)
    module = name.split(f".{layer}.", 1)[-1] if layer is not None else name
    path, _, param = module.rpartition(".")
    if layer is not None:
        found = rank(table.layer, path, whole=True)
        where = (1, layer, found if found is not None else (len(table.layer),))
    elif (found := rank(table.pre, path, whole=False)) is not None:
        where = (0, 0, found)
    elif (found := rank(table.post, path, whole=False)) is not None:
        where = (3, 0, found)
    else:
        where = _unnamed(name)
    if found is not None:
        return (*where, param_key(param))
    if anchors:
        raise RecipeError(
            f"over: tensors: {name} is not in model_type {order.model_type!r}'s natural "
            f"order (transformers' {table.source}), so its anchor would be a guess; leave "
            "it to another rule with a filter, or use over: layers"
        )
    return (*where, _module_key(module))


def _unnamed(name: str) -> tuple[int, int, Key]:
    """Where a tensor outside the layers that the family's table does not name goes."""
    section = _section(name)
    return (section, 0 if section == 2 else 1, ())


def _section(name: str) -> int:
    """Outside the layers, by name alone: embeddings 0, the head 3, anything else 2."""
    return 0 if "embed" in name or "wte." in name else 3 if "lm_head" in name else 2


def _module_key(module: str) -> list[str | int]:
    """A module path compared with its numbers as numbers, weight before bias."""
    return _digits(module.replace(".weight", ".0").replace(".bias", ".1"))


def _llama_key(name: str, stack: LayerStack | None) -> tuple[int, int, Key, list[str | int]]:
    layer = _layer(name, stack)
    if layer is not None:
        module = name.split(f".{layer}.", 1)[-1]
        i = next(
            (i for i, m in enumerate(MODULE_ORDER) if module.startswith(m + ".")), len(MODULE_ORDER)
        )
        return (1, layer, (i,), _module_key(module))
    return (_section(name), 0, (0,), _digits(name))


def _layer(name: str, stack: LayerStack | None) -> int | None:
    if stack is not None:
        return stack.layer_of(name)
    m = _NUMBERED.match(name)
    return int(m["n"]) if m is not None and m["prefix"] in DECODER_STACKS else None


def _digits(text: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
