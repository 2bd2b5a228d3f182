"""A merge written as one llama.cpp GGUF (`output: {format: gguf, quant: ...}`, DESIGN
§7): the plan's tensors, same values, under llama.cpp's names, each encoded in the type
llama.cpp would give it for that quant, Q and K rows permuted as llama.cpp's converter
permutes them; every tensor's data 32-byte aligned in one file, model-<quant>.gguf, or
(a shard size given) split files as llama.cpp's gguf-split names and gguf-py cuts them.

Decided from headers and config.json alone, like every plan: names, types, sizes and
offsets are known before a byte is read (the header is written first).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lazymerge.errors import InputError
from lazymerge.meaning.methods.linear import Linear
from lazymerge.plan.model import COMPUTE, CONSTANT, Encoding, MergePlan, PlannedTensor, Shard

ALIGNMENT = 32  # GGUF's default data alignment (general.alignment unset)
SPLIT_NAME = "{:s}-{:05d}-of-{:05d}.gguf"  # gguf-split's and gguf-py's split file names


def to_gguf(plan: MergePlan) -> MergePlan:
    """`plan` (its safetensors tensors) as one GGUF file."""
    from gguf import GGMLQuantizationType

    from lazymerge.meaning.gguf import ROPE_FREQS, arch_of, permuted_heads, rope_freqs, tensor_name
    from lazymerge.meaning.gguf_types import row_bytes, tensor_type

    out = plan.recipe.output
    assert out.quant is not None  # recipe/parse.py checks a GGUF has one
    if plan.config is None:
        raise InputError(
            f"{plan.base.path}: no config.json; a GGUF needs the architecture it describes"
        )
    arch = arch_of(plan.config, f"{plan.base.path}/config.json")
    n_layers = plan.stack.count
    names = {t.name: tensor_name(arch, t.name, n_layers) for t in plan.tensors}
    facts = {
        "tied_embeddings": "output.weight" not in names.values(),
        "llm_70b": _llm_70b(arch, plan.config, n_layers),
    }
    placed = []
    for t in plan.tensors:
        name = names[t.name]
        qtype = tensor_type(out.quant, name, t.shape, n_layers, **facts)
        heads = permuted_heads(arch, t.name, plan.config)
        encoding = Encoding(name, int(qtype), GGMLQuantizationType(qtype).name, heads)
        columns = t.shape[-1] if len(t.shape) > 1 else 1
        placed.append(_encoded(t, encoding, t.rows * row_bytes(columns, qtype)))
    freqs = rope_freqs(arch, plan.config)
    if freqs is not None:  # Llama 3.1's rope scaling: llama.cpp reads it as a tensor
        placed.append(_constant(ROPE_FREQS, freqs.astype("<f4").tobytes()))
    shards = _split(placed, f"model-{out.quant}", out.shard_size)
    return replace(plan, tensors=tuple(t for s in shards for t in s.tensors), shards=shards)


def _split(tensors: list[PlannedTensor], stem: str, limit: int | None) -> tuple[Shard, ...]:
    """The GGUF's files: one, or (`limit`) as gguf-py's writer and llama.cpp's gguf-split
    cut one: a new file when the next tensor's data would take this one's past `limit`
    (unpadded), named `<stem>-00001-of-00003.gguf`; offsets within each file's data."""
    groups: list[list[PlannedTensor]] = [[]]
    for t in tensors:
        if (
            limit is not None
            and groups[-1]
            and sum(u.nbytes for u in groups[-1]) + t.nbytes > limit
        ):
            groups.append([])
        groups[-1].append(t)
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


def _encoded(t: PlannedTensor, encoding: Encoding, nbytes: int) -> PlannedTensor:
    """`t` in the GGUF, `nbytes` encoded. A copy stays a copy (its input's values,
    re-encoded from the map by the encoding lane, or a GGUF input's bytes: run/tensor.py)
    unless its input is a strided view: then it goes through a method as its one input is."""
    t = replace(t, encoding=encoding, nbytes=nbytes, pad=-nbytes % ALIGNMENT)
    if t.action == COMPUTE or (t.inputs[0].ref.copyable and not t.inputs[0].terms):
        return t
    return replace(t, action=COMPUTE, method=Linear((1.0,)))
