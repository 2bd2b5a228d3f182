"""What a merge is, as frozen data: models, their adapters, gradient rules, output.

recipe/parse.py makes these from YAML (or from the command line's flags); everything
after the recipe reads them and never changes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

DTYPE_NAMES = {
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float32": "F32", "fp32": "F32", "float": "F32",
}  # fmt: skip
DTYPE_LABELS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
DEFAULT_SHARD_SIZE = 2 * 10**9
Over = Literal["layers", "tensors"]
Format = Literal["safetensors", "gguf"]
# GGUF encodings a recipe may ask for: llama.cpp's types, and its two k-quant mixes
# (meaning/gguf_types.py maps them; which tensor gets which type is llama.cpp's choice).
GGUF_MIXES = ("q4_k_m", "q5_k_m")
GGUF_QUANTS = (
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
    *GGUF_MIXES,
)  # fmt: skip


@dataclass(frozen=True)
class GradientRule:
    """One gradient: anchors over a span of decoder layers, `rest` everywhere else.

    `layers` is the half-open span [start, end); None means every layer of the model.
    `filter`, when set, limits the rule to tensors whose name contains it. With
    `over="tensors"` the anchors are spread over the tensors themselves (layers and rest
    do not apply), as BlockMerge_Gradient_Tensors does.
    """

    values: tuple[float, ...]
    layers: tuple[int, int] | None = None
    rest: float = 0.0
    filter: str | None = None
    over: Over = "layers"

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter in name


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    loras: tuple[LoraSpec, ...] = ()


Scalar = float | bool
Value = tuple[Scalar, ...]  # one: a constant; more: anchors spread over the decoder layers


@dataclass(frozen=True)
class Conditional:
    """A parameter's value for the tensors whose name contains `filter` (None: every one)."""

    filter: str | None
    value: Value


# A parameter's setting: the first conditional that matches a tensor decides; none
# matching passes the decision down to the next level (model, then method-wide, then the
# method's default). A plain value is one conditional with no filter.
Setting = tuple[Conditional, ...]
Parameters = dict[str, Setting]


@dataclass(frozen=True)
class MergeInput:
    """One model of an N-model merge, with its own parameters (weight, density...)."""

    model: ModelSpec
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One model's run of layers [start, end) feeding a slice, with its own parameters."""

    model: ModelSpec
    layers: tuple[int, int]
    parameters: Parameters = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class SliceSpec:
    """A run of output layers (mergekit's slice): its i-th layer is the method over each
    source's i-th layer of its range; the sources' ranges are equally long (checked)."""

    sources: tuple[SliceSource, ...]
    base: ModelSpec | None = None  # the slice's own base, over the recipe's
    parameters: Parameters = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class ModuleSpec:
    """One `modules:` entry (mergekit's modular architectures, recipe/modules.py): a
    module of the architecture (meaning/modules.py) by its key, merged by `slices`, or by
    `models` over every layer of it (their counts come from the checkpoints), with the
    module's own parameters between a slice's and the recipe's."""

    name: str  # the architecture's module key: text_decoder, vision_tower...
    slices: tuple[SliceSpec, ...] = ()
    models: tuple[MergeInput, ...] = ()
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """An N-model merge: a method (meaning/methods/registry.py) over the base and `models`.

    `models` are in the recipe's order. The base may be one of them (a mergekit config
    lists it among its models, with parameters); `base_at` says where, else the base
    joins as the last input (mergekit's rule) and only methods that weigh every input
    (linear) use it beyond taking task vectors against it.
    """

    name: str
    models: tuple[MergeInput, ...]
    parameters: Parameters = field(default_factory=dict)  # method-wide
    base_at: int | None = None
    seed: int = 0  # keys DARE/DELLA's random masks
    # The dtype the arithmetic runs in. None: float32 with one rounding to the output
    # dtype (native recipes). A mergekit config's `dtype` (inputs cast to it, every step
    # rounded in it), or "inputs": its inputs' promoted dtype, per tensor (mergekit with
    # no `dtype`).
    compute: str | None = None
    source: Literal["lazymerge", "mergekit"] = "lazymerge"  # the recipe's syntax
    # Layer surgery: the output's layers slice by slice (then `models` lists each model
    # the slices name, once, without parameters). None of them: every layer of the base.
    slices: tuple[SliceSpec, ...] = ()
    # A modular architecture's modules, each by its slices or models (then `models` lists
    # every model they name, once, without parameters), in the recipe's order.
    modules: tuple[ModuleSpec, ...] = ()
    # False: the recipe names no base; the recipe's base is then only where the config and
    # tokenizer come from (nuslerp and multislerp merge the models themselves).
    has_base: bool = True


@dataclass(frozen=True)
class OutputSpec:
    """What the merge writes: safetensors shards, or one llama.cpp GGUF (`format: gguf`)
    whose tensors hold the same values encoded as `quant` (write/quants.py)."""

    dtype: str | None = None  # safetensors code (F16, BF16, F32); None: the base's
    # Largest shard; None: DEFAULT_SHARD_SIZE for safetensors, one file for a GGUF (set, a
    # GGUF is split as llama.cpp's gguf-split splits one: plan/gguf.py).
    shard_size: int | None = None
    format: Format = "safetensors"
    quant: str | None = None  # gguf only: one of GGUF_QUANTS
    tokenizer: bool = True  # gguf only: False writes no tokenizer keys (llama.cpp refuses it)

    @property
    def shard_limit(self) -> int:
        """The largest safetensors shard."""
        return self.shard_size if self.shard_size is not None else DEFAULT_SHARD_SIZE


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from when a model lacks it (mergekit's `tokens:` source):
    `model`'s row for that token (`token`/`token_id` unset), `model`'s row for another
    token (`kind: model_token`), or zeros (`model` None)."""

    model: ModelSpec | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    """One `tokens:` entry: the token's default row, and whether it overrides every
    model's own row (`force`)."""

    token: str
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output's tokenizer: the base's, one model's, or the union of all the models'
    vocabularies; the vocabulary rows of every model are aligned to it by token."""

    source: Literal["base", "union"] | ModelSpec
    tokens: tuple[TokenRule, ...] = ()
    # The vocabulary rows rounded up to a multiple of this; each model's extra rows are
    # the mean of its aligned rows (mergekit's pad_to_multiple_of). None: no padding.
    pad: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A merge: base (+ LoRAs), optionally blended with other (+ LoRAs) by gradient rules."""

    base: ModelSpec
    other: ModelSpec | None = None
    gradient: tuple[GradientRule, ...] = ()
    output: OutputSpec = field(default_factory=OutputSpec)
    layers_prefix: str | None = None  # the decoder layers' stack, when the names can't say
    merge: MethodSpec | None = None  # an N-model merge (then no other/gradient)
    # The output's tokenizer (N-model merges); None: the base's files, rows as they are.
    tokenizer: TokenizerSpec | None = None
    # The chat template the output's tokenizer config gets: "auto" (the inputs' most
    # common) or a template's text (a built-in's name is resolved when parsed); None: kept.
    chat_template: str | None = None

    def models(self) -> list[ModelSpec]:
        """Every model of the recipe, the base first, each once."""
        models = [self.base] + ([self.other] if self.other else [])
        if self.merge is not None:
            models += [m.model for m in self.merge.models if m.model != self.base]
        return models

    def inputs(self) -> list[Path]:
        """Every input path, models and adapters."""
        models = self.models()
        return [p for m in models for p in (m.path, *(lo.path for lo in m.loras))]

    def with_output(self, **changes: Any) -> Recipe:
        """This recipe with the command line's output settings over its own (None: keep)."""
        given = {k: v for k, v in changes.items() if v is not None}
        return replace(self, output=replace(self.output, **given)) if given else self

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data with absolute paths: a valid recipe again (the model
        card prints it, the manifest records it)."""

        def model(m: ModelSpec) -> dict[str, Any]:
            loras = [{"path": str(lo.path), "weight": lo.weight} for lo in m.loras]
            return {"model": str(m.path), "loras": loras}

        def rule(r: GradientRule) -> dict[str, Any]:
            if r.over == "tensors":
                d: dict[str, Any] = {"values": list(r.values), "over": "tensors"}
                return d | ({"filter": r.filter} if r.filter is not None else {})
            d = {"values": list(r.values), "rest": r.rest}
            if r.layers is not None:
                d["layers"] = list(r.layers)
            if r.filter is not None:
                d["filter"] = r.filter
            return d

        data: dict[str, Any] = {"base": model(self.base)}
        if self.merge is not None:
            if not self.merge.has_base:
                del data["base"]
            data |= _merge_dict(self.merge, model)
        if self.other is not None:
            data["other"] = model(self.other)
            data["gradient"] = [rule(r) for r in self.gradient]
        data["output"] = _output_dict(self.output)
        if self.layers_prefix is not None:
            data["layers_prefix"] = self.layers_prefix
        if self.tokenizer is not None:
            data["tokenizer"] = _tokenizer_dict(self.tokenizer)
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return data


def _output_dict(out: OutputSpec) -> dict[str, Any]:
    """The output settings a recipe gave (unset ones left out)."""
    output: dict[str, Any] = {}
    if out.shard_size is not None:  # (unset: 2 GB shards, or one GGUF file)
        output["shard_size"] = out.shard_size
    if out.dtype is not None:
        output["dtype"] = DTYPE_LABELS[out.dtype]
    if out.format == "gguf":
        output |= {"format": "gguf", "quant": out.quant}
        output |= {} if out.tokenizer else {"tokenizer": False}
    return output


def _tokenizer_dict(spec: TokenizerSpec) -> dict[str, Any]:
    """A tokenizer spec in the native syntax (recipe/tokenizer.py reads it back)."""

    def source(s: TokenSource | None) -> Any:
        if s is None:
            return None
        if s.model is None:
            return {"kind": "zero"}
        if s.token is None and s.token_id is None:
            return str(s.model.path)
        which = {"token": s.token} if s.token is not None else {"token_id": s.token_id}
        return {"kind": "model_token", "model": str(s.model.path)} | which

    tokens = {
        r.token: {"source": source(r.source)} | ({"force": True} if r.force else {})
        for r in spec.tokens
    }
    given = spec.source if isinstance(spec.source, str) else str(spec.source.path)
    pad = {"pad_to_multiple_of": spec.pad} if spec.pad is not None else {}
    return {"source": given} | ({"tokens": tokens} if tokens else {}) | pad


def _setting(setting: Setting) -> Any:
    def value(v: Value) -> Any:
        return v[0] if len(v) == 1 else list(v)

    if len(setting) == 1 and setting[0].filter is None:
        return value(setting[0].value)
    return [
        {"value": value(c.value)} | ({"filter": c.filter} if c.filter is not None else {})
        for c in setting
    ]


def _merge_dict(m: MethodSpec, model: Any) -> dict[str, Any]:
    """An N-model merge in the native syntax (recipe/models.py); a mergekit config's
    precision as `compute`."""

    def params(p: Parameters) -> dict[str, Any]:
        return {k: _setting(v) for k, v in p.items()}

    def piece(s: SliceSpec) -> dict[str, Any]:
        sources = [
            model(src.model) | {"layers": list(src.layers), "parameters": params(src.parameters)}
            for src in s.sources
        ]
        base = {"base": model(s.base)} if s.base is not None else {}
        return {"sources": sources, **base, "parameters": params(s.parameters)}

    def entries(inputs: tuple[MergeInput, ...]) -> list[dict[str, Any]]:
        return [model(e.model) | {"parameters": params(e.parameters)} for e in inputs]

    def module(mod: ModuleSpec) -> dict[str, Any]:
        given = {"slices": [piece(s) for s in mod.slices]} if mod.slices else {}
        given = given or {"models": entries(mod.models)}
        return given | {"parameters": params(mod.parameters)}

    data: dict[str, Any] = {"method": m.name}
    if m.modules:
        data["modules"] = {mod.name: module(mod) for mod in m.modules}
    elif m.slices:
        data["slices"] = [piece(s) for s in m.slices]
    else:
        data["models"] = entries(m.models)
    data |= {"parameters": params(m.parameters), "seed": m.seed}
    if m.compute is not None:
        data["compute"] = DTYPE_LABELS.get(m.compute, m.compute)
    return data
