"""PEFT LoRA adapters: pair lora_A/lora_B by the base tensor they modify, know the scale.

A term contributes `weight * scale * (B @ A)` to its base tensor, with `scale = alpha / r`
(or `alpha / sqrt(r)` for rsLoRA). Only references are kept; the engine reads the bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError
from lazymerge.index import CheckpointIndex, TensorRef, read_tensor_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", optionally with an
# adapter-name segment ("lora_A.default.weight") as some PEFT versions save it.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
# These initialisations rewrite the base weights during training; their adapter alone
# does not describe the change, so merging it onto the original base would be wrong.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraTerm:
    """One low-rank update of one base tensor: `scale * (b @ a)`, weight included."""

    target: str
    a: TensorRef  # [r, in]
    b: TensorRef  # [out, r]
    scale: float
    adapter: Path

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class LoraAdapter:
    """A PEFT adapter directory, opened lazily: config + tensor references."""

    def __init__(self, path: Path, weight: float, terms: dict[str, LoraTerm]) -> None:
        self.path = path
        self.weight = weight
        self.terms = terms

    @classmethod
    def open(cls, path: str | Path, weight: float = 1.0) -> LoraAdapter:
        p = Path(path)
        config = _read_config(p)
        tensors = read_tensor_file(_weights_file(p))
        pairs = _pair(p, tensors)
        terms = {target: _term(p, config, target, a, b, weight) for target, (a, b) in pairs.items()}
        return cls(p, weight, terms)

    def check_against(self, index: CheckpointIndex) -> None:
        """Every term must target a tensor of `index` whose shape is [out, in] of B @ A."""
        for term in self.terms.values():
            if term.target not in index:
                raise InputError(
                    f"{self.path}: adapter tensor {term.a.name} targets {term.target}, "
                    f"which {index.path} does not have"
                )
            base = index[term.target]
            want = (term.b.shape[0], term.a.shape[1])
            if base.shape != want:
                raise InputError(
                    f"{self.path}: {term.b.name} @ {term.a.name} is {list(want)} but "
                    f"{term.target} in {index.path} is {list(base.shape)}"
                )


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
    _refuse_unsupported(path, config)
    return config


def _refuse_unsupported(path: Path, config: dict[str, Any]) -> None:
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(f"{path}: peft_type {kind!r} is not a LoRA adapter")
    if config.get("fan_in_fan_out"):
        raise InputError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported yet")
    if config.get("use_dora"):
        raise InputError(f"{path}: DoRA adapters are not supported yet")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise InputError(
            f"{path}: init_lora_weights={init!r} changes the base model during training; "
            "convert the adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )


def _weights_file(path: Path) -> Path:
    """adapter_model.safetensors, else the older adapter_model.bin (read without pickle code)."""
    for name in (WEIGHTS, WEIGHTS_BIN):
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path}: no {WEIGHTS} or {WEIGHTS_BIN}")


def _pair(path: Path, tensors: dict[str, TensorRef]) -> dict[str, tuple[TensorRef, TensorRef]]:
    found: dict[tuple[str, str | None], dict[str, TensorRef]] = {}
    for name, ref in tensors.items():
        m = _KEY.match(name)
        if m is None:
            raise InputError(
                f"{path}: adapter tensor {name!r} is not a lora_A/lora_B weight; "
                "embedding LoRA, modules_to_save, biases and DoRA are not supported yet"
            )
        found.setdefault((m["module"], m["adapter"]), {})[m["ab"]] = ref
    adapters = {adapter for _, adapter in found}
    if len(adapters) > 1:
        raise InputError(
            f"{path}: holds several adapters {sorted(map(str, adapters))}; expected one"
        )
    pairs = {}
    for (module, _), ab in found.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise InputError(f"{path}: {module} has no {missing} weight")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise InputError(
                f"{path}: rank mismatch for {module}: lora_A is {list(a.shape)}, "
                f"lora_B is {list(b.shape)} (need [r, in] and [out, r])"
            )
        if not (a.is_float and b.is_float):
            raise InputError(f"{path}: {module} has non-float LoRA weights ({a.dtype})")
        pairs[f"{module}.weight"] = (a, b)
    return pairs


def _pattern(patterns: object, module: str) -> object:
    """PEFT's rule: a key of rank_pattern/alpha_pattern matches a module name suffix."""
    if not isinstance(patterns, dict):
        return None
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _term(
    path: Path, config: dict[str, Any], target: str, a: TensorRef, b: TensorRef, weight: float
) -> LoraTerm:
    module = target.removesuffix(".weight")
    r = a.shape[0]  # the tensors are the truth; rank_pattern only repeats it
    alpha = _pattern(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or r == 0:
        raise InputError(f"{path}: lora_alpha for {module} is {alpha!r}, expected a number")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraTerm(target, a, b, weight * scale, path)
