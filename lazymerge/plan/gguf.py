"""A merge written as one llama.cpp GGUF (`output: {format: gguf, quant: ...}`, DESIGN
§7): the plan's tensors, same values, under llama.cpp's names, each encoded in the type
llama.cpp would give it for that quant, Q and K rows permuted as llama.cpp's converter
permutes them; every tensor's data 32-byte aligned in one file, model-<quant>.gguf, or
(a shard size given) split files as llama.cpp's gguf-split names and gguf-py cuts them.

Decided from headers and config.json alone, like every plan: names, types, sizes and
offsets are known before a byte is read (the header is written first).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lazymerge.errors import InputError
from lazymerge.meaning.methods.linear import Linear
from lazymerge.plan.model import COMPUTE, CONSTANT, Encoding, MergePlan, PlannedTensor, Shard

if TYPE_CHECKING:  # gguf-py comes with it, imported when a GGUF is planned
    from lazymerge.meaning.gguf_types import ModelFacts

ALIGNMENT = 32  # GGUF's default data alignment (general.alignment unset)
SPLIT_NAME = "{:s}-{:05d}-of-{:05d}.gguf"  # gguf-split's and gguf-py's split file names


def to_gguf(plan: MergePlan) -> MergePlan:
    """`plan` (its safetensors tensors) as one GGUF file, or its splits."""
    from lazymerge.meaning import gguf as llama_cpp
    from lazymerge.meaning.gguf_types import ModelFacts

    out = plan.recipe.output
    assert out.quant is not None  # recipe/parse.py checks a GGUF has one
    config = plan.config
    if config is None:
        raise InputError(
            f"{plan.base.path}: no config.json; a GGUF needs the architecture it describes"
        )
    arch = llama_cpp.arch_of(config, f"{plan.base.path}/config.json")
    kept = tuple(t for t in plan.tensors if not llama_cpp.dropped(arch, t.name))
    plan = replace(plan, tensors=kept)
    targets = {t.name: llama_cpp.gguf_target(arch, t.name, plan.stack.count) for t in plan.tensors}
    facts = ModelFacts(
        plan.stack.count,
        tied_embeddings="output.weight" not in {name for name, _ in targets.values()},
        llm_70b=_llm_70b(arch, config, plan.stack.count),
        n_expert=llama_cpp.n_experts(config),
    )
    units = [
        _unit(plan, arch, name, members, facts)
        for name, members in _stacks(plan.tensors, targets).items()
    ]
    freqs = llama_cpp.rope_freqs(arch, config)
    if freqs is not None:  # Llama 3.1's rope scaling: llama.cpp reads it as a tensor
        units.append([_constant(llama_cpp.ROPE_FREQS, freqs.astype("<f4").tobytes())])
    if arch == llama_cpp.PHI3:  # a long-context Phi 3's: two more
        rope = llama_cpp.phi3_rope(config, f"{plan.base.path}/config.json")
        for name, values in (("rope_factors_long.weight", rope.long),
                             ("rope_factors_short.weight", rope.short)):  # fmt: skip
            if values:
                units.append([_constant(name, struct.pack(f"<{len(values)}f", *values))])
    shards = _split(units, f"model-{out.quant}", out.shard_size)
    return replace(plan, tensors=tuple(t for s in shards for t in s.tensors), shards=shards)


def _stacks(
    tensors: Sequence[PlannedTensor], targets: dict[str, tuple[str, int | None]]
) -> dict[str, list[PlannedTensor]]:
    """The output tensors of each GGUF tensor, in the GGUF's order (each first seen):
    one, or a MoE projection's experts in expert order, checked whole and alike."""
    stacks: dict[str, dict[int, PlannedTensor]] = {}
    for t in tensors:
        name, expert = targets[t.name]
        held = stacks.setdefault(name, {})
        key = -1 if expert is None else expert
        if key in held or (held and (expert is None) != (-1 in held)):
            other = next(iter(held.values())).name
            raise InputError(f"{t.name} and {other} are both llama.cpp's {name}; a GGUF holds one")
        held[key] = t
    for name, held in stacks.items():
        first = next(iter(held.values()))
        if -1 not in held and (
            sorted(held) != list(range(len(held)))
            or any((t.shape, t.dtype) != (first.shape, first.dtype) for t in held.values())
        ):
            raise InputError(
                f"{first.name}: the experts of llama.cpp's {name} are not 0..{len(held) - 1}, "
                "each of one shape and dtype; a GGUF stacks them into one tensor"
            )
    return {name: [held[k] for k in sorted(held)] for name, held in stacks.items()}


def _unit(
    plan: MergePlan, arch: Any, name: str, members: list[PlannedTensor], facts: ModelFacts
) -> list[PlannedTensor]:  # 5 parameters: the GGUF tensor, and the plan facts its type reads
    """One GGUF tensor: its output tensors encoded, one after another (a MoE's experts)."""
    from gguf import GGMLQuantizationType

    from lazymerge.meaning.gguf import EXPERT, norm_shift, permuted_heads
    from lazymerge.meaning.gguf_types import row_bytes, tensor_type

    first, out = members[0], plan.recipe.output
    assert out.quant is not None and plan.config is not None  # to_gguf checked both
    stack = len(members) if EXPERT.fullmatch(first.name) else 0
    shape = (stack, *first.shape) if stack else first.shape
    qtype = tensor_type(out.quant, name, shape, facts)
    heads = permuted_heads(arch, first.name, plan.config)
    columns = first.shape[-1] if len(first.shape) > 1 else 1
    nbytes = first.rows * row_bytes(columns, qtype)
    pad = -nbytes * len(members) % ALIGNMENT  # after the last: the stack is one tensor
    return [
        _encoded(
            t, Encoding(name, int(qtype), GGMLQuantizationType(qtype).name, heads, stack, part,
                        norm_shift(arch, first.name)),
            nbytes, pad if part == len(members) - 1 else 0,
        )
        for part, t in enumerate(members)
    ]  # fmt: skip


def _split(units: list[list[PlannedTensor]], stem: str, limit: int | None) -> tuple[Shard, ...]:
    """The GGUF's files: one, or (`limit`) as gguf-py's writer and llama.cpp's gguf-split
    cut one: a new file when the next tensor's data would take this one's past `limit`
    (unpadded), named `<stem>-00001-of-00003.gguf`; offsets within each file's data."""
    groups: list[list[PlannedTensor]] = [[]]
    for unit in units:
        size = sum(t.nbytes for t in unit)
        if limit is not None and groups[-1] and sum(t.nbytes for t in groups[-1]) + size > limit:
            groups.append([])
        groups[-1].extend(unit)
    names = [f"{stem}.gguf"] if len(groups) == 1 else [
        SPLIT_NAME.format(stem, i + 1, len(groups)) for i in range(len(groups))
    ]  # fmt: skip
    shards = []
    for i, (name, group) in enumerate(zip(names, groups, strict=True)):
        offset, placed = 0, []
        for t in group:
            placed.append(replace(t, shard=i, offset=offset))
            offset += t.nbytes + t.pad
        shards.append(Shard(name, tuple(placed)))
    return tuple(shards)


def _llm_70b(arch: object, config: dict[str, Any], n_layers: int) -> bool:
    """llama.cpp's LLM_TYPE_70B, which its Q4_K_M rules read: 80 layers (a Llama with
    grouped-query attention)."""
    if n_layers != 80:
        return False
    heads = config.get("num_attention_heads")
    return str(arch).endswith("QWEN2") or config.get("num_key_value_heads", heads) != heads


def _constant(name: str, data: bytes) -> PlannedTensor:
    """A float32 vector the plan computes itself (no input)."""
    encoding = Encoding(name, 0, "F32")  # GGMLQuantizationType.F32
    return PlannedTensor(
        name, "F32", (len(data) // 4,), len(data), CONSTANT, (), pad=-len(data) % ALIGNMENT,
        encoding=encoding, data=data,
    )  # fmt: skip


def _encoded(t: PlannedTensor, encoding: Encoding, nbytes: int, pad: int) -> PlannedTensor:
    """`t` in the GGUF, `nbytes` encoded, `pad` after. A copy stays a copy (its input's
    values, re-encoded from the map by the encoding lane, or a GGUF input's bytes:
    run/tensor.py) unless its input is a strided view: then it goes through a method."""
    t = replace(t, encoding=encoding, nbytes=nbytes, pad=pad)
    if t.action == COMPUTE or (t.inputs[0].ref.copyable and not t.inputs[0].terms):
        return t
    return replace(t, action=COMPUTE, method=Linear((1.0,)))
