"""Random checkpoints with real Llama key names and layout, for the demo, tests, benchmarks.

They are written shard by shard through the safetensors library, so a generator's own
memory is bounded by one shard, never the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lazymerge.index import BIN_INDEX, DTYPES, SAFETENSORS_INDEX
from lazymerge.writer import build_header

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


def _random_pieces(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """A random tensor in row chunks: weights ~ N(0, 0.02), norms ~ N(1, 0.1) as trained ones."""
    if len(shape) == 1:
        yield torch.empty(shape, dtype=dtype).normal_(1.0, 0.1, generator=gen)
        return
    rows, row_bytes = shape[0], _nbytes(shape[1:], dtype)
    step = max(1, CHUNK // max(row_bytes, 1))
    for r0 in range(0, rows, step):
        piece = (min(step, rows - r0), *shape[1:])
        yield torch.empty(piece, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def _random(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(list(_random_pieces(shape, gen, dtype)))


def write_llama(
    directory: str | Path,
    shape: LlamaShape,
    *,
    seed: int,
    dtype: torch.dtype = torch.float16,
    shard_size: int = 2 * 10**9,
    fmt: str = "safetensors",
) -> Path:
    """A random Llama checkpoint: shards of at most `shard_size` + index + config.json.

    safetensors shards are streamed piece by piece (memory: one piece, never a shard);
    `fmt="bin"` writes 2023-style `pytorch_model-*.bin` shards with torch.save, which
    holds a shard in memory: meant for small test models.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups = _split(list(shape.tensors()), dtype, shard_size)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        if fmt == "safetensors":
            name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            _stream_safetensors(out / name, group, gen, dtype)
        else:
            name = f"pytorch_model-{k + 1:05d}-of-{len(groups):05d}.bin"
            torch.save({t: _random(dims, gen, dtype) for t, dims in group}, out / name)
        weight_map.update(dict.fromkeys((t for t, _ in group), name))
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


def _split(
    tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, shard_size: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        n = _nbytes(dims, dtype)
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += n
    return groups


def _stream_safetensors(
    path: Path, group: list[tuple[str, tuple[int, ...]]], gen: torch.Generator, dtype: torch.dtype
) -> None:
    code = next(c for c, d in DTYPES.items() if d == dtype)
    entries, offset = [], 0
    for name, dims in group:
        entries.append(_Entry(name, code, dims, offset, _nbytes(dims, dtype)))
        offset += entries[-1].nbytes
    with open(path, "wb") as f:
        f.write(build_header(entries))
        for _, dims in group:
            for piece in _random_pieces(dims, gen, dtype):
                f.write(piece.reshape(-1).view(torch.uint8).numpy().data)


def write_lora(
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
    tensors = {}
    for name, dims in shape.tensors():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = dims
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / in_f**0.5).to(
            dtype
        )
        tensors[f"{key}.lora_B.weight"] = (0.01 * torch.randn(out_f, r, generator=gen)).to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
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
