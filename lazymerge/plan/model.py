"""The plan's data: every output tensor's inputs, method, parameters, shard and offset.

Frozen values, decided from headers alone (build.py); the executor (lazymerge.run)
follows them and decides nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lazymerge.meaning.adapters import LoraTerm
from lazymerge.meaning.layers import LayerStack
from lazymerge.meaning.methods import Method
from lazymerge.meaning.methods.base import Resolved
from lazymerge.meaning.names import Mapping
from lazymerge.read.checkpoint import CheckpointIndex

if TYPE_CHECKING:
    from lazymerge.plan.vocab import OutputTokenizer
from lazymerge.read.tensorref import Blocks, TensorRef
from lazymerge.recipe.spec import LoraSpec, Recipe


class Action(StrEnum):
    """How an output tensor's bytes are made."""

    COPY_BASE = "copy-base"  # the base's bytes, as they are
    COPY_OTHER = "copy-other"  # the other's bytes, as they are
    COPY = "copy"  # an N-model merge's one input's bytes, as they are (passthrough)
    CONSTANT = "constant"  # bytes the plan holds (a GGUF's rope_freqs: from config.json)
    COMPUTE = "compute"  # rows streamed through the tensor's method


COPY_BASE, COPY_OTHER, COMPUTE = Action.COPY_BASE, Action.COPY_OTHER, Action.COMPUTE
COPY, CONSTANT = Action.COPY, Action.CONSTANT
# Which of the recipe's models an input is: "base", "other" (the founding recipe), or
# "models[i]" (an N-model recipe's i-th entry).
Role = str


@dataclass(frozen=True, eq=False)
class RowMap:
    """A vocabulary tensor read by token (plan/vocab.py): output row i is the model's row
    `own[i]`, or where that is ABSENT the default: the rows `defaults[i]` names (other
    inputs' too), summed in order and divided by their count in `dtype`; () is zeros."""

    own: np.ndarray
    defaults: dict[int, tuple[tuple[TensorRef, int], ...]]
    dtype: str  # the tensor's compute dtype, where mergekit averages

    @functools.cached_property
    def sources(self) -> tuple[TensorRef, ...]:
        """The other inputs' tensors the default rows are read from."""
        return tuple(dict.fromkeys(ref for parts in self.defaults.values() for ref, _ in parts))


@dataclass(frozen=True)
class Input:
    """One model's tensor as a merge reads it: its bytes and the adapter terms applied to
    them on the fly (` in DESIGN §2); a vocabulary tensor aligned to the output's
    tokenizer, by token (`gather`)."""

    role: Role
    ref: TensorRef
    terms: tuple[LoraTerm, ...] = ()
    gather: RowMap | None = None

    @property
    def rows(self) -> int:
        """Rows as the method sees them: the output vocabulary's when gathered."""
        return len(self.gather.own) if self.gather is not None else self.ref.rows

    def refs(self) -> list[TensorRef]:
        """Every input tensor this one reads: its own and its terms' factors."""
        return [self.ref] + [r for term in self.terms for r in term.refs()]


@dataclass(frozen=True)
class Encoding:
    """How a GGUF holds an output tensor (plan/gguf.py): llama.cpp's name for it, its
    type, and the Q/K row permutation llama.cpp's converter applies within each of
    `heads` heads (None: rows as they are). The values are the tensor's in `dtype`."""

    name: str  # "blk.3.attn_q.weight"
    qtype: int  # gguf.GGMLQuantizationType
    type_name: str  # "Q8_0", for people
    heads: int | None = None
    # A MoE's experts, one GGUF tensor [experts, rows, columns] (`blk.3.ffn_up_exps`): how
    # many (0: not stacked), and which one this output tensor is, its bytes after the
    # previous expert's.
    stack: int = 0
    part: int = 0
    # Gemma's norms: llama.cpp's converter adds 1 (its graph multiplies by w, transformers'
    # by 1 + w), in the checkpoint's dtype when that is float16, else in float32.
    shift: float = 0.0

    def copies(self, dtype: str) -> bool:
        """The bytes are the tensor's in `dtype` as they are (a copy may serve)."""
        return self.heads is None and self.type_name == dtype and not self.shift

    def same_blocks(self, blocks: Blocks) -> bool:
        """A GGUF input's bytes are this encoding's: same type, same row order."""
        return (self.qtype, self.heads) == (blocks.qtype, blocks.heads) and not self.shift


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where its bytes come from, how they combine, where they go."""

    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    nbytes: int  # in the output dtype
    action: Action
    # COPY*: the one input copied. COMPUTE: the method's inputs, the base first.
    inputs: tuple[Input, ...]
    method: Method | None = None  # COMPUTE only: the method with this tensor's parameters
    ratio: float = 0.0  # the gradient's fraction of `other`
    rule: int | None = None  # index of the gradient rule that decided `ratio`, if any
    shard: int = 0  # set when the plan is split into shards
    offset: int = 0  # within the shard's data section
    # Leading rows every input has (a smaller vocabulary); past them, the base's alone.
    shared_rows: int = -1  # -1: all of them
    call: Resolved | None = None  # N-model merges: the parameters the method was built from
    encoding: Encoding | None = None  # a GGUF output's: name, type, permutation
    pad: int = 0  # zero bytes after it in its file (GGUF aligns every tensor's data)
    data: bytes | None = None  # CONSTANT: its bytes

    def __post_init__(self) -> None:
        if self.shared_rows < 0:
            object.__setattr__(self, "shared_rows", self.rows)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row (1 for a 1-D tensor, whose elements are its rows)."""
        return math.prod(self.shape[1:])

    @property
    def row_align(self) -> int:
        """Blocks of rows start at multiples of this: a permuted GGUF tensor's head."""
        e = self.encoding
        return self.rows // e.heads if e is not None and e.heads else 1

    def reads(self) -> list[TensorRef]:
        """The input tensors producing this one reads (LoRA factors last)."""
        refs = [i.ref for i in self.inputs]
        return refs + [r for i in self.inputs for term in i.terms for r in term.refs()]

    def side(self, role: Role) -> Input | None:
        """The input of model `role` ("base", "other"), if this tensor reads it."""
        return next((i for i in self.inputs if i.role == role), None)

    def terms(self, role: Role) -> tuple[LoraTerm, ...]:
        """The adapter terms applied to model `role`'s tensor here."""
        side = self.side(role)
        return side.terms if side is not None else ()

    def describe(self) -> dict[str, Any]:
        """The decision, as the manifest and `plan --json` record it. An N-model merge's
        tensor adds its method, the parameters it was resolved to (method-wide, then
        each input's by role), each input's LoRAs, and the passes it takes over them."""
        decision: dict[str, Any] = {
            "ratio": self.ratio,
            "action": str(self.action),
            "base_loras": [str(lo.adapter) for lo in self.terms("base")],
            "other_loras": [str(lo.adapter) for lo in self.terms("other")],
        }
        if self.encoding is not None:
            e = self.encoding
            decision["gguf"] = {"name": e.name, "type": e.type_name, "permuted_heads": e.heads}
        if self.call is None or self.method is None:
            return decision  # the founding recipe's tensors (and buffers) say no more
        inputs = zip(self.inputs, self.call.per_input, strict=True)
        return decision | {
            "method": self.method.describe(),
            "parameters": {
                "shared": dict(self.call.shared),
                "inputs": {i.role: dict(params) for i, params in inputs},
            },
            "loras": {i.role: [str(lo.adapter) for lo in i.terms] for i in self.inputs if i.terms},
            "passes": 1 + self.method.stat_passes(),
        }


@dataclass(frozen=True)
class AdapterUse:
    """One adapter of the recipe as the plan opened it."""

    role: Role  # the model it sits on
    spec: LoraSpec  # as the recipe names it
    path: Path  # the directory opened (PEFT may keep it in a subfolder of spec.path)
    terms: int  # tensors it changes, before the gradient drops any
    renamed: Mapping = ()  # the prefixes its module names were mapped by (meaning/names.py)


@dataclass(frozen=True)
class Shard:
    name: str
    tensors: tuple[PlannedTensor, ...]
    # A GGUF's header (write/gguf.py, attached before writing); None: safetensors', built
    # from the tensors
    header: bytes | None = None

    @property
    def data_size(self) -> int:
        return sum(t.nbytes + t.pad for t in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    base: CheckpointIndex
    other: CheckpointIndex | None
    stack: LayerStack  # the decoder layers
    tensors: tuple[PlannedTensor, ...]
    shards: tuple[Shard, ...]
    config: dict[str, Any] | None = None  # the base's config.json, checked
    dropped: tuple[str, ...] = ()  # base tensors deliberately left out (see build.DROPPED)
    notes: tuple[str, ...] = ()  # what the user should know (vocabulary mismatches)
    adapters: tuple[AdapterUse, ...] = ()  # every adapter of the recipe, in recipe order
    models: tuple[CheckpointIndex, ...] = ()  # an N-model merge's models but the base
    # The recipe's tokenizer source (plan/vocab.py); None: the base's files as they are.
    tokenizer: OutputTokenizer | None = None
    chat_template: str | None = None  # the template text the output's tokenizer gets

    @property
    def out_dtype(self) -> str | None:
        """The dtype config.json names: the recipe's; for an N-model merge without one,
        its tensors' (a mergekit config's compute dtype), when they agree."""
        if self.recipe.output.dtype is not None or self.recipe.merge is None:
            return self.recipe.output.dtype
        codes = {t.dtype for t in self.tensors if t.call is not None}
        return codes.pop() if len(codes) == 1 else None

    @property
    def n_layers(self) -> int:
        return self.stack.count

    @property
    def bytes_to_write(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_to_read(self) -> int:
        """Input bytes the merge touches: sources of each tensor plus their LoRA factors."""
        return sum(ref.nbytes for ref in self.reads())

    def reads(self) -> list[TensorRef]:
        """Every input tensor the merge reads, in execution order (A factors included)."""
        return [ref for t in self.tensors for ref in t.reads()]

    def input_files(self) -> list[Path]:
        """Every input file the plan reads (model shards and adapter weights)."""
        files = list(self.base.files) + (list(self.other.files) if self.other else [])
        files += [f for m in self.models for f in m.files]
        for t in self.tensors:
            files += [term.a.file for i in t.inputs for term in i.terms]
        return list(dict.fromkeys(files))
