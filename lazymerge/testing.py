"""Fixture code for the tests, `make demo` and the benchmarks: not part of the merge.

Builds random checkpoints with real Llama key names and layout, and random PEFT LoRA
adapters, so the merge has something to run on without downloading a 13B model.
Nothing in the merge path imports this module. It reuses the planner's shard split and
file names (lazymerge.plan.shards), so the checkpoints it builds are sharded exactly
as the merge's own output would be.

safetensors shards are streamed piece by piece, so a generator's own memory is bounded
by one piece, never a shard or the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lazymerge.plan.shards import shard_name, split
from lazymerge.read.checkpoint import BIN_INDEX, SAFETENSORS_INDEX
from lazymerge.read.mapped import DTYPES
from lazymerge.write.safetensors import build_header

Format = Literal["safetensors", "bin"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    layers: int = 8
    hidden: int = 256
    intermediate: int = 688
    heads: int = 8
    kv_heads: int = 8
    vocab: int = 1000

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order transformers' state_dict gives."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        yield "model.embed_tokens.weight", (self.vocab, h)
        for n in range(self.layers):
            p = f"model.layers.{n}."
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


# Random data is generated and written in pieces of about this size, so a generator
# never holds more than one piece, even for a 13B model's 327 MB embedding.
CHUNK = 64 * 2**20


@dataclass(frozen=True)
class _Entry:  # what writer.build_header needs to know of a tensor
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _Spec:  # one random tensor to write: N(mean, std)
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float


def _llama_spec(name: str, shape: tuple[int, ...]) -> _Spec:
    # Weights ~ N(0, 0.02); norms ~ N(1, 0.1), as trained ones are.
    return _Spec(name, shape, 1.0, 0.1) if len(shape) == 1 else _Spec(name, shape, 0.0, 0.02)


def _random_pieces(spec: _Spec, gen: torch.Generator, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """A random tensor in row chunks of about CHUNK bytes."""
    rows = spec.shape[0] if spec.shape else 1
    step = max(1, CHUNK // max(_nbytes(spec.shape[1:], dtype), 1))
    for r0 in range(0, rows, step):
        piece = (min(step, rows - r0), *spec.shape[1:])
        yield torch.empty(piece, dtype=dtype).normal_(spec.mean, spec.std, generator=gen)


def _random(spec: _Spec, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(list(_random_pieces(spec, gen, dtype))).reshape(spec.shape)


def write_llama(  # a fixture's settings: keyword-only, each with a default but the seed
    directory: str | Path,
    shape: LlamaShape,
    *,
    seed: int,
    dtype: torch.dtype = torch.float16,
    shard_size: int = 2 * 10**9,
    fmt: Format = "safetensors",
) -> Path:
    """A random Llama checkpoint: shards of at most `shard_size` + index + config.json.

    safetensors shards are streamed piece by piece (memory: one piece, never a shard);
    `fmt="bin"` writes 2023-style `pytorch_model-*.bin` shards with torch.save, which
    holds a shard in memory: meant for small test models.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    specs = [_llama_spec(*t) for t in shape.tensors()]
    groups = [
        [specs[i] for i in r] for r in split([_nbytes(s.shape, dtype) for s in specs], shard_size)
    ]
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        if fmt == "safetensors":
            name = shard_name(k, len(groups))
            _stream_safetensors(out / name, group, gen, dtype)
        else:
            name = shard_name(k, len(groups), "pytorch_model", "bin")
            torch.save({t.name: _random(t, gen, dtype) for t in group}, out / name)
        weight_map.update(dict.fromkeys((t.name for t in group), name))
    total = sum(_nbytes(dims, dtype) for _, dims in shape.tensors())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_name = SAFETENSORS_INDEX if fmt == "safetensors" else BIN_INDEX
    (out / index_name).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _stream_safetensors(
    path: Path, specs: list[_Spec], gen: torch.Generator, dtype: torch.dtype
) -> None:
    code = next(c for c, d in DTYPES.items() if d == dtype)
    entries, offset = [], 0
    for spec in specs:
        entries.append(_Entry(spec.name, code, spec.shape, offset, _nbytes(spec.shape, dtype)))
        offset += entries[-1].nbytes
    with open(path, "wb") as f:
        f.write(build_header(entries))
        for spec in specs:
            for piece in _random_pieces(spec, gen, dtype):
                f.write(piece.reshape(-1).view(torch.uint8).numpy().data)


def write_lora(  # a fixture's settings: keyword-only, each with a default but the seed
    directory: str | Path,
    shape: LlamaShape,
    *,
    seed: int,
    r: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = LORA_TARGETS,
    dtype: torch.dtype = torch.float32,
    use_rslora: bool = False,
) -> Path:
    """A random PEFT LoRA adapter (both factors non-zero) for a LlamaShape model."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    specs = []
    for name, (out_f, in_f) in (t for t in shape.tensors() if len(t[1]) == 2):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            key = f"base_model.model.{module}"
            specs.append(_Spec(f"{key}.lora_A.weight", (r, in_f), 0.0, in_f**-0.5))
            specs.append(_Spec(f"{key}.lora_B.weight", (out_f, r), 0.0, 0.01))
    _stream_safetensors(out / "adapter_model.safetensors", specs, gen, dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
