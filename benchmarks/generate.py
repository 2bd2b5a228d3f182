"""python -m benchmarks.generate OUT --layers N: a 13B-shaped base, other and LoRA.

Llama-2-13B tensor shapes and key names (hidden 5120, intermediate 13824, 40 heads, vocab
32000), fp16, ~2 GB shards + index + config.json, and a PEFT LoRA (r=64, alpha=16, the
seven projections), all streamed: the generator never holds more than a 64 MiB piece.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate")
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--tiny", action="store_true", help="a few-MB model for smoke tests")
    args = parser.parse_args(argv)
    generate(args.out, args.layers, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
