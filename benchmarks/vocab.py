"""python -m benchmarks.vocab [--repeat N] [--work DIR]: what aligning vocabularies by
token costs (issue 17) on a 13B-shaped vocabulary (32000 x 5120, fp16; one decoder layer).

Three merges of two models, alternated, each cold, timed with its CPU and peak RSS:
  plain   two models with the same 32000-token vocabulary, no tokenizer source
  union   the second adds two chat tokens (32002 rows): `tokenizer_source: union`, its
          rows realigned by token (read through a row map)
  base    the plain pair with `tokenizer_source: base`: no row moves, read as they are
The tokenizers are word-level ones written here (`t0`..`t31999`): only their token
strings matter to the alignment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.lanes import timed
from benchmarks.runner import drop_caches
from lazymerge.testing import LlamaShape, write_llama

SHAPE = LlamaShape(layers=1, hidden=5120, intermediate=512, heads=40, kv_heads=40, vocab=32000)
CHAT = ("<|im_start|>", "<|im_end|>")


def write_tokenizer(directory: Path, words: int, added: tuple[str, ...]) -> None:
    """A word-level tokenizer.json of `words` tokens, then `added` special tokens."""
    extra = [
        {"id": words + k, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for k, c in enumerate(added)
    ]  # fmt: skip
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": extra,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(words)}, "unk_token": "t0"},
    }  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(data))
    (directory / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast"}'
    )


def models(work: Path) -> None:
    """a, a2 (same vocabulary) and b (two tokens more), once."""
    for name, added, seed in (("a", (), 0), ("a2", (), 2), ("b", CHAT, 1)):
        d = work / name
        if not (d / "config.json").is_file():
            shape = LlamaShape(**{**SHAPE.__dict__, "vocab": SHAPE.vocab + len(added)})
            write_llama(d, shape, seed=seed, dtype=torch.float16)
        write_tokenizer(d, SHAPE.vocab, added)


def recipe(work: Path, second: str, source: str | None) -> Path:
    cfg: dict[str, Any] = {
        "merge_method": "linear", "base_model": str(work / "a"), "dtype": "float16",
        "models": [{"model": str(work / m), "parameters": {"weight": 0.5}} for m in ("a", second)],
    }  # fmt: skip
    if source is not None:
        cfg["tokenizer_source"] = source
    path = work / f"{second}-{source}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/lazymerge-bench-vocab"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models(args.work)
    cases = {"plain": ("a2", None), "union": ("b", "union"), "base": ("a2", "base")}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
    for _ in range(args.repeat):
        for name, (second, source) in cases.items():
            out = args.work / "out"
            shutil.rmtree(out, ignore_errors=True)
            drop_caches()
            cmd = [
                sys.executable,
                "-m",
                "lazymerge",
                "merge",
                str(recipe(args.work, second, source)),
            ]
            runs[name].append(timed([*cmd, "-o", str(out), "-q"], dict(os.environ)))
    for name, rs in runs.items():
        times = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        median = statistics.median(r["seconds"] for r in rs)
        peak = max(r["peak_rss"] for r in rs) / 2**20
        print(f"{name:6s} {times} s  median {median:.1f} s  peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
