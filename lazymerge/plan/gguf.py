"""A merge written as one llama.cpp GGUF (`output: {format: gguf, quant: ...}`, DESIGN
§7): the plan's tensors, same values, under llama.cpp's names, each encoded in the type
llama.cpp would give it for that quant, Q and K rows permuted as llama.cpp's converter
permutes them; every tensor's data 32-byte aligned in one file, model-<quant>.gguf.

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
    placed, offset = [], 0
    for t in plan.tensors:
        name = names[t.name]
        qtype = tensor_type(out.quant, name, t.shape, n_layers, **facts)
        heads = permuted_heads(arch, t.name, plan.config)
        encoding = Encoding(name, int(qtype), GGMLQuantizationType(qtype).name, heads)
        columns = t.shape[-1] if len(t.shape) > 1 else 1
        nbytes = t.rows * row_bytes(columns, qtype)
        pad = -nbytes % ALIGNMENT
        placed.append(_encoded(t, encoding, nbytes, pad, offset))
        offset += nbytes + pad
    freqs = rope_freqs(arch, plan.config)
    if freqs is not None:  # Llama 3.1's rope scaling: llama.cpp reads it as a tensor
        placed.append(_constant(ROPE_FREQS, freqs.astype("<f4").tobytes(), offset))
    shard = Shard(f"model-{out.quant}.gguf", tuple(placed))
    return replace(plan, tensors=shard.tensors, shards=(shard,))


def _llm_70b(arch: object, config: dict[str, Any], n_layers: int) -> bool:
    """llama.cpp's LLM_TYPE_70B, which its Q4_K_M rules read: 80 layers (a Llama with
    grouped-query attention)."""
    if n_layers != 80:
        return False
    heads = config.get("num_attention_heads")
    return str(arch).endswith("QWEN2") or config.get("num_key_value_heads", heads) != heads


def _constant(name: str, data: bytes, offset: int) -> PlannedTensor:
    """A float32 vector the plan computes itself (no input), at `offset`."""
    encoding = Encoding(name, 0, "F32")  # GGMLQuantizationType.F32
    return PlannedTensor(
        name, "F32", (len(data) // 4,), len(data), CONSTANT, (), pad=-len(data) % ALIGNMENT,
        offset=offset, encoding=encoding, data=data,
    )  # fmt: skip


def _encoded(
    t: PlannedTensor, encoding: Encoding, nbytes: int, pad: int, offset: int
) -> PlannedTensor:
    """`t` in the GGUF. A copy stays a copy (its input's values, re-encoded from the map
    by the encoding lane, run/tensor.py) unless its input is laid out otherwise: then
    it goes through a method as its one input is."""
    t = replace(t, encoding=encoding, nbytes=nbytes, pad=pad, shard=0, offset=offset)
    if t.action == COMPUTE or (t.inputs[0].ref.copyable and not t.inputs[0].terms):
        return t
    return replace(t, action=COMPUTE, method=Linear((1.0,)))
