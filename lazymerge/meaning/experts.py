"""PEFT LoRAs on fused expert parameters (`target_parameters`) -> the checkpoint's tensors.

transformers 5 fuses a mixture-of-experts layer's experts in memory into 3-D parameters
`<layer>.mlp.experts.gate_up_proj` and `.down_proj`. Most families hold them as
(E, out, in) -- [E, 2I, H] and [E, H, I] -- and save them one expert at a time, as their
checkpoints always stored them (its conversion_mapping.py): Mixtral-style
`<layer>.block_sparse_moe.experts.<e>.w1/w3/w2.weight`, Qwen2-MoE-style
`<layer>.mlp.experts.<e>.gate_proj/up_proj/down_proj.weight` (gate the first I rows).
Others have no conversion and save the 3-D tensors as they are: gpt-oss holds them as
(E, in, out) -- `gate_up_proj` [E, H, 2I], gate and up interleaved column by column, and
`down_proj` [E, I, H], used as `x @ W` (GptOssExperts, declared
`use_experts_implementation(is_transposed=True)`), each with a bias PEFT leaves alone.

PEFT's ParamWrapper holds one such parameter's LoRA as lora_A [r·E, in] and lora_B
[out, r·E]; expert e's delta is `B[:, e::E] @ A[e·r:(e+1)·r]` ([out, in]), stored
transposed in an (E, in, out) parameter (its get_delta_weight: einsum `o r e, e r i` to
`e o i`, or to `e i o` when the experts class says `is_transposed`). Saved one by one, each
expert is a plain LoRA on its tensor: A's rows are an offset, B's columns a strided view,
gate and up the two row halves of B. Saved fused, the parameter's LoRA is one term whose
layout the checkpoint's tensor decides (`transposed`). Several parameters of one module
nest: the first in the module's order is innermost, saved with the most `.base_layer.`
segments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError
from lazymerge.read.tensorref import TensorRef, itemsize

# The fused parameters of transformers' expert classes, in their modules' order.
FUSED = ("gate_up_proj", "down_proj")
# Families whose experts class transformers declares `is_transposed=True`
# (integrations/moe.py use_experts_implementation): experts held as (E, in, out), which
# PEFT's ParamWrapper follows. Only a square expert needs it: other shapes tell.
TRANSPOSED = frozenset({"gpt_oss", "openai_privacy_filter", "aria", "aria_text"})
# In-memory per-expert names (how Qwen2-MoE-style checkpoints store them) per fused one.
PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?\.experts)(?P<nest>(?:\.base_layer)*)"
    r"\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_PER_EXPERT = re.compile(r"^(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.(?P<part>\w+)\.weight$")


@dataclass(frozen=True)
class ExpertFactors:
    """One expert's LoRA factors for one saved tensor, cut from a fused parameter's."""

    target: str  # in-memory per-expert name, e.g. model.layers.0.mlp.experts.3.gate_proj.weight
    a: TensorRef  # [r, in]
    b: TensorRef  # [out, r]
    fused: str  # the parameter PEFT adapted, e.g. model.layers.0.mlp.experts.gate_up_proj


def split(
    config: dict[str, Any], tensors: dict[str, TensorRef]
) -> tuple[dict[str, dict[int, dict[str, TensorRef]]], dict[str, TensorRef]]:
    """({module: {nesting: {"A"/"B": ref}}} of fused-expert LoRAs, the other tensors)."""
    targets = config.get("target_parameters") or []
    fused: dict[str, dict[int, dict[str, TensorRef]]] = {}
    rest: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        m = _KEY.match(name)
        if m is None or not targets or not _targeted(m["module"], targets):
            rest[name] = ref
            continue
        depth = m["nest"].count(".base_layer")
        fused.setdefault(m["module"], {}).setdefault(depth, {})[m["ab"]] = ref
    return fused, rest


def _targeted(module: str, targets: Sequence[str]) -> list[str]:
    """The fused parameters of `module` that target_parameters names (PEFT's rule: the
    parameter's full name, or a suffix of it after a dot), in the module's order."""
    return [
        p
        for p in FUSED
        if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in targets)
    ]


@dataclass(frozen=True)
class FusedLora:
    """One fused expert parameter's LoRA, as PEFT saved it."""

    param: str  # e.g. model.layers.0.mlp.experts.gate_up_proj
    a: TensorRef  # [r·E, in]
    b: TensorRef  # [out, r·E]
    rank: int

    @property
    def experts(self) -> int:
        return self.a.shape[0] // self.rank


def loras(
    path: Path,
    config: dict[str, Any],
    module: str,
    levels: dict[int, dict[str, TensorRef]],
    rank: Callable[[str], int],
) -> list[FusedLora]:
    """The LoRA of every fused parameter of `module` the adapter holds, its shapes
    checked; `rank(parameter name)` is the rank the config gives it."""
    params = _targeted(module, config.get("target_parameters") or [])
    if sorted(levels) != list(range(len(params))):
        raise InputError(
            f"{path}: {module} has LoRAs on {len(levels)} nested parameters, but "
            f"target_parameters names {params or 'none'} of its {', '.join(FUSED)}"
        )
    out = []
    for depth, parts in levels.items():
        param = f"{module}.{params[len(params) - 1 - depth]}"
        if "A" not in parts or "B" not in parts:
            raise InputError(f"{path}: {param} has no lora_{'B' if 'A' in parts else 'A'} weight")
        a, b, r = parts["A"], parts["B"], rank(param)
        if (
            r <= 0
            or len(a.shape) != 2
            or len(b.shape) != 2
            or a.shape[0] != b.shape[1]
            or a.shape[0] % r
        ):
            raise InputError(
                f"{path}: {param}: lora_A is {list(a.shape)}, lora_B is {list(b.shape)}; need "
                f"[r·experts, in] and [out, r·experts] with r={r}"
            )
        out.append(FusedLora(param, a, b, r))
    return out


def per_expert(path: Path, lora: FusedLora) -> list[ExpertFactors]:
    """Every expert's factors for every tensor of a checkpoint that saves them one by one."""
    module, _, kind = lora.param.rpartition(".")
    a, b, r, experts, parts = lora.a, lora.b, lora.rank, lora.experts, PARTS[kind]
    if b.shape[0] % len(parts):
        raise InputError(
            f"{path}: {lora.param}: lora_B has {b.shape[0]} rows, not gate + up halves"
        )
    out_rows = b.shape[0] // len(parts)
    a_strides, b_strides = _strides(a), _strides(b)
    found = []
    for e in range(experts):
        a_e = _view(a, e * r * a_strides[0], (r, a.shape[1]), a_strides, f"[{e * r}:{(e + 1) * r}]")
        for i, part in enumerate(parts):
            start = i * out_rows
            b_e = _view(
                b,
                start * b_strides[0] + e * b_strides[1],
                (out_rows, r),
                (b_strides[0], experts * b_strides[1]),
                f"[{start}:{start + out_rows}, {e}::{experts}]",
            )
            found.append(ExpertFactors(f"{module}.{e}.{part}.weight", a_e, b_e, lora.param))
    return found


def transposed(path: Path, lora: FusedLora, stored: TensorRef, model_type: str | None) -> bool:
    """Whether the checkpoint stores `lora`'s parameter, fused, as (E, in, out) rather than
    (E, out, in). Its shape says; where each expert is square, its family does, as for
    PEFT (the experts class's `is_transposed`). A shape that fits neither is refused."""
    e, n_in, n_out = lora.experts, lora.a.shape[1], lora.b.shape[0]
    plain, flipped = (e, n_out, n_in), (e, n_in, n_out)
    if stored.shape not in (plain, flipped):
        fits = " or ".join(str(list(s)) for s in dict.fromkeys((plain, flipped)))
        raise InputError(
            f"{path}: {lora.param}: lora_A {list(lora.a.shape)} and lora_B "
            f"{list(lora.b.shape)} are a rank-{lora.rank} LoRA on {e} experts of "
            f"[{n_out}, {n_in}], which fits a {fits} tensor, but {stored.name} in "
            f"{stored.file} is {list(stored.shape)}; was the adapter trained on this model?"
        )
    if plain != flipped:
        return stored.shape == flipped
    return model_type in TRANSPOSED


def _strides(ref: TensorRef) -> tuple[int, ...]:
    if ref.strides is not None:
        return ref.strides
    return tuple(
        math.prod(ref.shape[i + 1 :]) for i in range(len(ref.shape))
    )  # row-major, in elements


def _view(
    ref: TensorRef, start: int, shape: tuple[int, int], strides: tuple[int, ...], what: str
) -> TensorRef:
    """A view of `ref` from element `start` with `shape` and element `strides`."""
    size = itemsize(ref.dtype)
    plain = strides == (shape[1], 1)
    reach = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
    return TensorRef(
        f"{ref.name}{what}",
        ref.file,
        ref.dtype,
        shape,
        ref.offset + start * size,
        shape[0] * shape[1] * size,
        None if plain else tuple(strides),
        None if plain else reach * size,
    )


def restyled(target: str) -> str:
    """A per-expert in-memory name as Mixtral-style checkpoints store it."""
    m = _PER_EXPERT.match(target)
    if m is None or m["part"] not in _MIXTRAL:
        return target
    return f"{m['pre']}.block_sparse_moe.experts.{m['e']}.{_MIXTRAL[m['part']]}.weight"
