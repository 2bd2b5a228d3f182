"""PEFT adapters: every change an adapter makes to a base tensor, as a term.

Kinds of term, in the order the executor (run/rows.py) applies them to one tensor:
- REPLACE: `modules_to_save` weights, trained biases, saved embedding layers
  (`<module>.base_layer.weight`): `W <- W + weight * (S - W)`, i.e. S itself at weight 1;
- LORA: `weight * scale * (B @ A)`, `scale = alpha / r` (rsLoRA: `alpha / sqrt(r)`);
- LORA_T: the same, transposed: embedding LoRA (`lora_embedding_A/B`) and
  `fan_in_fan_out` (GPT-2 Conv1D) adapters;
- a LoRA on fused expert parameters (PEFT `target_parameters`) becomes one LORA term per
  expert per tensor where the checkpoint saves the experts one by one, and one LORA_X
  (LORA_XT) term on the 3-D tensor where it saves them fused as (E, out, in) ((E, in, out)):
  expert e's slice `+= weight * scale * B[:, e::E] @ A[e·r:(e+1)·r]` (its transpose)
  (meaning/experts.py);
- and for DoRA a LORA term carries the magnitude vector m: after the delta,
  `W' = m / ||W + ΔW||_row * (W + ΔW)` (exact at weight 1; other weights are refused).
Only references are kept; the executor reads the bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError
from lazymerge.meaning import experts
from lazymerge.meaning.names import Mapping, fitting_mapping, rename
from lazymerge.read.checkpoint import CheckpointIndex, read_tensor_file
from lazymerge.read.config import checkpoint_config
from lazymerge.read.tensorref import TensorRef

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"


class TermKind(StrEnum):
    REPLACE = "replace"
    LORA = "lora"
    LORA_T = "lora_t"
    LORA_X = "lora_experts"
    LORA_XT = "lora_experts_t"


REPLACE, LORA, LORA_T = TermKind.REPLACE, TermKind.LORA, TermKind.LORA_T
LORA_X, LORA_XT = TermKind.LORA_X, TermKind.LORA_XT
_PREFIX = r"^(?:base_model\.model\.)?(?P<module>.+?)"
_NAME = r"(?:\.(?P<adapter>[^.]+))?"  # "lora_A.default.weight": an adapter-name segment
_KEYS = [
    ("pair", re.compile(_PREFIX + r"\.lora_(?P<ab>[AB])" + _NAME + r"\.weight$")),
    ("embedding", re.compile(_PREFIX + r"\.lora_embedding_(?P<ab>[AB])" + _NAME + r"$")),
    ("magnitude", re.compile(_PREFIX + r"\.lora_magnitude_vector" + _NAME + r"(?:\.weight)?$")),
    (
        "replace",
        re.compile(
            _PREFIX + r"\.(?:base_layer|modules_to_save" + _NAME + r")\.(?P<param>weight|bias)$"
        ),
    ),
    ("replace", re.compile(_PREFIX + r"\.(?P<param>weight|bias)$")),  # modules_to_save, newer PEFT
]
# These initialisations rewrite the base weights during training; their adapter alone
# does not describe the change, so merging it onto the original base would be wrong.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraTerm:
    """One change of one base tensor by one adapter (see the module docstring)."""

    target: str
    kind: TermKind
    # A [r, in] (LORA), [r, rows] (LORA_T), [r·E, in] (LORA_X(T)); REPLACE: the new tensor
    a: TensorRef
    # B [out, r] (LORA), [cols, r] (LORA_T), [out, r·E] (LORA_X(T)); REPLACE: None
    b: TensorRef | None
    scale: float  # weight * alpha / r for deltas; the weight for REPLACE
    adapter: Path
    weight: float  # the recipe's weight for this adapter (part of `scale`)
    magnitude: TensorRef | None = None  # DoRA's m [out]
    fused: str | None = None  # the fused expert parameter this term was cut from, if any
    experts: int = 0  # LORA_X(T): E, the experts along dim 0 of the target

    @property
    def rank(self) -> int:
        return self.a.shape[0] // max(self.experts, 1) if self.kind != REPLACE else 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the base tensor this term fits."""
        if self.kind == REPLACE or self.b is None:
            return self.a.shape
        if self.kind == LORA:
            return (self.b.shape[0], self.a.shape[1])
        if self.kind == LORA_X:
            return (self.experts, self.b.shape[0], self.a.shape[1])
        if self.kind == LORA_XT:
            return (self.experts, self.a.shape[1], self.b.shape[0])
        return (self.a.shape[1], self.b.shape[0])

    def refs(self) -> list[TensorRef]:
        return [r for r in (self.a, self.b, self.magnitude) if r is not None]


class LoraAdapter:
    """A PEFT adapter directory, opened lazily: config + tensor references.

    `terms` name the experts of a LoRA on fused expert parameters one by one; `stacked`
    holds one term per such parameter, for a checkpoint that stores it fused."""

    def __init__(
        self, path: Path, weight: float, terms: list[LoraTerm], stacked: Sequence[LoraTerm] = ()
    ) -> None:
        self.path = path
        self.weight = weight
        self.terms = terms
        self.stacked = tuple(stacked)

    @classmethod
    def open(cls, path: str | Path, weight: float = 1.0) -> LoraAdapter:
        p = _adapter_dir(Path(path))
        config = _read_config(p)
        tensors = read_tensor_file(_weights_file(p))
        modules, tensors = experts.split(config, tensors)
        per_expert, stacked = _expert_terms(p, config, modules, weight)
        return cls(p, weight, per_expert + _terms(p, config, tensors, weight), stacked)

    def fit(self, index: CheckpointIndex) -> tuple[LoraAdapter, Mapping]:
        """This adapter with its targets named as `index` stores them (see names.py), and
        the mapping that did it (() when none was needed); checked against `index`."""
        for terms in self._namings():
            mapping = fitting_mapping([t.target for t in terms], index.tensors)
            if mapping is not None:
                break
        else:
            raise InputError(self._missing(index))
        terms = [replace(t, target=rename(t.target, mapping)) for t in terms]
        fitted = LoraAdapter(self.path, self.weight, self._laid_out(terms, index))
        fitted.check_against(index)
        return fitted, mapping

    def _namings(self) -> list[list[LoraTerm]]:
        """The terms as a checkpoint may store fused experts: one by one as transformers
        names them in memory (Qwen-MoE), as Mixtral's checkpoints do, or fused."""
        namings = [self.terms, _restyled(self.terms)]
        if self.stacked:
            namings.append([t for t in self.terms if t.fused is None] + list(self.stacked))
        return namings

    def _laid_out(self, terms: list[LoraTerm], index: CheckpointIndex) -> list[LoraTerm]:
        """Terms on fused 3-D expert tensors, in the layout `index` stores them."""
        if not any(t.experts for t in terms):
            return terms
        model_type = (checkpoint_config(index.path) or {}).get("model_type")
        out = []
        for t in terms:
            if t.experts:
                assert t.b is not None and t.fused is not None  # stacked terms have both
                lora = experts.FusedLora(t.fused, t.a, t.b, t.rank)
                if experts.transposed(self.path, lora, index[t.target], model_type):
                    t = replace(t, kind=LORA_XT)
            out.append(t)
        return out

    def _missing(self, index: CheckpointIndex) -> str:
        """Why the terms fit no naming of `index`, in one line."""
        named = max(self._namings(), key=lambda ts: sum(t.target in index for t in ts))
        missing = next(t for t in named if t.target not in index)
        if missing.fused is None or missing.experts:
            return (
                f"{self.path}: adapter tensor {missing.a.name} targets {missing.target}, "
                f"which {index.path} does not have (nor under a known name mapping)"
            )
        return (
            f"{self.path}: {missing.a.name} is expert {missing.target.split('.')[-3]} of "
            f"{missing.fused}, but {index.path} has no {missing.target}"
        )

    def check_against(self, index: CheckpointIndex) -> None:
        """Every term must target a tensor of `index` that has the shape it fits."""
        for term in self.terms:
            if term.target not in index:
                raise InputError(
                    f"{self.path}: adapter tensor {term.a.name} targets {term.target}, "
                    f"which {index.path} does not have"
                )
            base = index[term.target]
            if base.shape != term.shape:
                what = " @ ".join(r.name for r in (term.b, term.a) if r is not None)
                raise InputError(
                    f"{self.path}: {what} is {list(term.shape)} but "
                    f"{term.target} in {index.path} is {list(base.shape)}"
                )
            if term.magnitude is not None and term.magnitude.shape != (base.shape[0],):
                raise InputError(
                    f"{self.path}: {term.magnitude.name} is {list(term.magnitude.shape)}, "
                    f"{term.target} has {base.shape[0]} rows"
                )


def _adapter_dir(path: Path) -> Path:
    """PEFT saves a non-default adapter name into a subdirectory of that name."""
    if not path.is_dir() or (path / CONFIG).is_file():
        return path
    inner = sorted(p for p in path.iterdir() if (p / CONFIG).is_file())
    if len(inner) == 1:
        return inner[0]
    if inner:
        names = ", ".join(p.name for p in inner)
        raise InputError(f"{path}: holds several adapters ({names}); name one of them")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise InputError(f"{path}: an adapter is a directory with {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no {CONFIG}; is this a PEFT LoRA adapter?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path / CONFIG}: not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(f"{path}: peft_type {kind!r} is not a LoRA adapter")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise InputError(
            f"{path}: init_lora_weights={init!r} changes the base model during training; "
            "convert the adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    return config


def _weights_file(path: Path) -> Path:
    """adapter_model.safetensors, else the older adapter_model.bin (read without pickle code)."""
    for name in (WEIGHTS, WEIGHTS_BIN):
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path}: no {WEIGHTS} or {WEIGHTS_BIN}")


def _classify(path: Path, tensors: dict[str, TensorRef]) -> dict[str, dict[str, TensorRef]]:
    """target tensor name -> {"A"/"B"/"m"/"S": ref}; one adapter name at most."""
    found: dict[str, dict[str, TensorRef]] = {}
    adapters = set()
    for name, ref in tensors.items():
        match = next(((k, m) for k, p in _KEYS if (m := p.match(name)) is not None), None)
        if match is None:
            raise InputError(
                f"{path}: adapter tensor {name!r} is not a LoRA, DoRA or saved-module weight"
            )
        kind, m = match
        adapters.add(m.groupdict().get("adapter"))
        module = m["module"]
        if kind == "replace":
            found.setdefault(f"{module}.{m['param']}", {})["S"] = ref
        else:
            slot = {
                "pair": m.groupdict().get("ab"),
                "embedding": "E" + (m.groupdict().get("ab") or ""),
                "magnitude": "m",
            }[kind]
            found.setdefault(f"{module}.weight", {})[str(slot)] = ref
    if len(adapters) > 1:
        raise InputError(
            f"{path}: holds several adapters {sorted(map(str, adapters))}; expected one"
        )
    for ref in tensors.values():
        if not ref.is_float:
            raise InputError(f"{path}: {ref.name} is {ref.dtype}, not a float tensor")
    return found


def _restyled(terms: list[LoraTerm]) -> list[LoraTerm]:
    return [replace(t, target=experts.restyled(t.target)) if t.fused else t for t in terms]


def _expert_terms(
    path: Path, config: dict[str, Any], modules: dict[str, Any], weight: float
) -> tuple[list[LoraTerm], list[LoraTerm]]:
    """For LoRAs on fused expert parameters: one LORA term per expert per tensor of a
    checkpoint that stores them one by one, and one LORA_X term per parameter (its layout
    told when fitted: LoraAdapter.fit) for one that stores them fused."""
    per_expert, stacked = [], []
    for module, levels in modules.items():
        for lora in experts.loras(path, config, module, levels, lambda p: _rank(config, p)):
            for ref in (lora.a, lora.b):
                if not ref.is_float:
                    raise InputError(f"{path}: {ref.name} is {ref.dtype}, not a float tensor")
            scale = weight * _scale(path, config, lora.param, lora.rank)
            whole = LoraTerm(lora.param, LORA_X, lora.a, lora.b, scale, path, weight)
            stacked.append(replace(whole, fused=lora.param, experts=lora.experts))
            per_expert += [
                LoraTerm(f.target, LORA, f.a, f.b, scale, path, weight, fused=f.fused)
                for f in experts.per_expert(path, lora)
            ]
    return per_expert, stacked


def _terms(
    path: Path, config: dict[str, Any], tensors: dict[str, TensorRef], weight: float
) -> list[LoraTerm]:
    terms: list[LoraTerm] = []
    for target, parts in _classify(path, tensors).items():
        if "S" in parts:  # replaced first (a saved embedding), then any delta on top
            terms.append(LoraTerm(target, REPLACE, parts["S"], None, weight, path, weight))
            if set(parts) == {"S"}:
                continue
        a, b, kind = _factors(path, target, parts, config)
        magnitude = parts.get("m")
        if config.get("use_dora") and magnitude is None:
            raise InputError(f"{path}: use_dora is set but {target} has no lora_magnitude_vector")
        if magnitude is not None and weight != 1:
            raise InputError(
                f"{path}: a DoRA adapter is exact only at weight 1 (got {weight}); its "
                "magnitude vector does not scale with the delta"
            )
        scale = weight * _scale(path, config, target, a.shape[0])
        terms.append(LoraTerm(target, kind, a, b, scale, path, weight, magnitude))
    return terms


def _factors(
    path: Path, target: str, parts: dict[str, TensorRef], config: dict[str, Any]
) -> tuple[TensorRef, TensorRef, TermKind]:
    module = target.removesuffix(".weight")
    if "EA" in parts or "EB" in parts:
        a, b, kind, names = (
            parts.get("EA"),
            parts.get("EB"),
            LORA_T,
            ("lora_embedding_A", "lora_embedding_B"),
        )
    else:
        a, b, names = parts.get("A"), parts.get("B"), ("lora_A", "lora_B")
        kind = LORA_T if config.get("fan_in_fan_out") else LORA
    if a is None or b is None:
        raise InputError(
            f"{path}: {module} has no {names[1] if a is not None else names[0]} weight"
        )
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise InputError(
            f"{path}: rank mismatch for {module}: {names[0]} is {list(a.shape)}, "
            f"{names[1]} is {list(b.shape)} (need [r, ...] and [..., r])"
        )
    return a, b, kind


def _pattern(patterns: object, module: str) -> object:
    """PEFT's rule: a key of rank_pattern/alpha_pattern matches a module name suffix."""
    if not isinstance(patterns, dict):
        return None
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _rank(config: dict[str, Any], param: str) -> int:
    r = _pattern(config.get("rank_pattern"), param)
    r = config.get("r", 8) if r is None else r
    return r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else 0


def _scale(path: Path, config: dict[str, Any], target: str, r: int) -> float:
    module = target.removesuffix(".weight")
    alpha = _pattern(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or r == 0:
        raise InputError(f"{path}: lora_alpha for {module} is {alpha!r}, expected a number")
    return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
