"""python -m benchmarks.generate OUT --layers N: a 13B-shaped base, other and LoRA.

Llama-2-13B tensor shapes and key names (hidden 5120, intermediate 13824, 40 heads, vocab
32000), fp16, ~2 GB shards + index + config.json, and a PEFT LoRA (r=64, alpha=16, the
seven projections), all streamed: the generator never holds more than a 64 MiB piece.

With `--finetunes K`: a base and K fine-tunes of it instead (base + a small random task
vector each), for the N-model methods (benchmarks/methods.py); streamed as well.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import torch

from lazymerge.read.mapped import DTYPES
from lazymerge.read.safetensors import read_header
from lazymerge.read.tensorref import TensorRef
from lazymerge.testing import LlamaShape, write_llama, write_lora

LLAMA2_13B = LlamaShape(
    layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32000
)
# The smoke test's shape: the same code path at a few MB.
TINY = LlamaShape(layers=40, hidden=256, intermediate=688, heads=8, kv_heads=8, vocab=1000)


def generate(out: Path, layers: int, tiny: bool = False) -> None:
    shape = replace(TINY if tiny else LLAMA2_13B, layers=layers)
    shard = 4 * 10**6 if tiny else 2 * 10**9
    write_llama(out / "base", shape, seed=1, shard_size=shard)
    write_llama(out / "other", shape, seed=2, shard_size=shard)
    write_lora(out / "lora", shape, seed=3, r=8 if tiny else 64, alpha=16)


# A task vector is ~3 % of a tensor's spread (write_llama: weights N(0, 0.02), norms
# N(1, 0.1)), as in tests/mergekit_ref.py: small next to the weights, as in fine-tuning,
# yet some 40 fp16 ulps of a typical weight, so TIES/DARE have real work on every element.
TASK_SCALE = 0.03
# Values are read, changed and written in pieces of this many bytes (fp16: 8 Mi elements,
# three fp32 temporaries of 32 MiB each).
PIECE = 16 * 2**20


def generate_finetunes(out: Path, layers: int, finetunes: int, tiny: bool = False) -> None:
    """out/base and out/finetune-1..K: the base of `generate`, and K fine-tunes of it."""
    shape = replace(TINY if tiny else LLAMA2_13B, layers=layers)
    shard = 4 * 10**6 if tiny else 2 * 10**9
    base = write_llama(out / "base", shape, seed=1, shard_size=shard)
    for k in range(1, finetunes + 1):
        write_finetune(base, out / f"finetune-{k}", seed=100 + k, size=1.0 + 0.5 * (k - 1))


def write_finetune(base: Path, out: Path, *, seed: int, size: float = 1.0) -> Path:
    """A fine-tune of the checkpoint `base`: its bytes + a random task vector, streamed.

    delta = TASK_SCALE * spread * size * (0.5 * common + private): `common` is drawn the
    same for every seed (signs agree more often than chance), `private` per seed (TIES'
    sign vote splits too). Each value is rounded to the base's dtype once, as saving a
    fine-tune does. Shards, index and config keep the base's names and layout.
    """
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.iterdir()):
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copyfile(f, out / f.name)
    common = torch.Generator().manual_seed(0)
    private = torch.Generator().manual_seed(seed)
    for shard in sorted(base.glob("*.safetensors")):
        with open(shard, "rb") as src, open(out / shard.name, "wb") as dst:
            (header_len,) = struct.unpack("<Q", src.read(8))
            src.seek(0)
            dst.write(src.read(8 + header_len))  # the same names, shapes and offsets
            for ref in read_header(shard).values():
                _finetune_tensor(ref, src, dst, (common, private), size)
    return out


def _finetune_tensor(
    ref: TensorRef, src: BinaryIO, dst: BinaryIO, gens: tuple[torch.Generator, ...], size: float
) -> None:
    spread = 0.1 if len(ref.shape) == 1 else 0.02  # write_llama's norms and weights
    scale = TASK_SCALE * spread * size
    dtype = DTYPES[ref.dtype]
    src.seek(ref.offset)
    left = ref.nbytes
    while left > 0:
        n = min(left, PIECE)
        x = torch.frombuffer(bytearray(src.read(n)), dtype=dtype).float()
        delta = torch.empty_like(x).normal_(generator=gens[0]).mul_(0.5)
        delta.add_(torch.empty_like(x).normal_(generator=gens[1]))
        dst.write(x.add_(delta, alpha=scale).to(dtype).view(torch.uint8).numpy().data)
        left -= n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate")
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--tiny", action="store_true", help="a few-MB model for smoke tests")
    parser.add_argument(
        "--finetunes", type=int, default=0,
        help="a base and this many fine-tunes of it, instead of base, other and LoRA",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.finetunes:
        generate_finetunes(args.out, args.layers, args.finetunes, args.tiny)
    else:
        generate(args.out, args.layers, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
