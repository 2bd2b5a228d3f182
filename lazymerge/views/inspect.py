"""`lazymerge inspect`: what a checkpoint or an adapter holds, from its metadata alone."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from lazymerge.errors import LazyMergeError
from lazymerge.meaning.adapters import CONFIG, LoraAdapter
from lazymerge.meaning.layers import LayerStack, find_stack, natural_key
from lazymerge.meaning.order import order_of
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.config import checkpoint_config
from lazymerge.read.tensorref import TensorRef
from lazymerge.views.report import human_bytes

SHORT_LISTING = 12


def describe(path: Path, show_all: bool = False) -> str:
    """A checkpoint's or an adapter's summary and tensor listing."""
    if (path / CONFIG).is_file():
        return _adapter(path, show_all)
    gguf = sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    if gguf and gguf[0].suffix == ".gguf" and not any(path.glob("*.safetensors*")):
        return _gguf(gguf[0], show_all)
    return _checkpoint(path, show_all)


def _gguf(path: Path, show_all: bool) -> str:
    """A GGUF file (lazymerge's output, or llama.cpp's): architecture, types, tensors."""
    from gguf import GGMLQuantizationType

    from lazymerge.read.gguf import read_gguf

    g = read_gguf(path)
    arch = g.get("general.architecture") or "?"
    tensors = g.tensors
    types = Counter(GGMLQuantizationType(t.qtype).name for t in tensors)
    params = sum(math.prod(t.dims) for t in tensors)
    layers = g.get(f"{arch}.block_count")
    shown = tensors if show_all else tensors[:SHORT_LISTING]
    width = max((len(t.name) for t in shown), default=0)
    lines = [
        f"gguf: {path} ({human_bytes(path.stat().st_size)})",
        f"architecture: {arch}; decoder layers: {layers if layers is not None else '?'}; "
        f"tokenizer: {'yes' if 'tokenizer.ggml.tokens' in g.fields else 'none'}",
        f"tensors: {len(tensors)} ({', '.join(f'{k} x{n}' for k, n in types.most_common())}); "
        f"parameters: {params:,}",
        *(f"  {t.name:<{width}}  {GGMLQuantizationType(t.qtype).name:<5} {list(t.shape)}"
          for t in shown),
    ]  # fmt: skip
    if len(shown) < len(tensors):
        lines.append(f"  ... {len(tensors) - len(shown)} more (--all lists every tensor)")
    return "\n".join(lines)


def _listing(refs: list[TensorRef], show_all: bool, stack: LayerStack | None = None) -> list[str]:
    refs = sorted(refs, key=lambda r: natural_key(r.name, stack))
    shown = refs if show_all else refs[:SHORT_LISTING]
    width = max((len(r.name) for r in shown), default=0)
    lines = [f"  {r.name:<{width}}  {r.dtype:<4} {list(r.shape)}" for r in shown]
    if len(shown) < len(refs):
        lines.append(f"  ... {len(refs) - len(shown)} more (--all lists every tensor)")
    return lines


def _dtypes(refs: list[TensorRef]) -> str:
    return ", ".join(f"{d} x{n}" for d, n in Counter(r.dtype for r in refs).most_common())


def _checkpoint(path: Path, show_all: bool) -> str:
    index = CheckpointIndex.open(path)
    refs = list(index)
    params = sum(r.numel for r in refs)
    cfg = checkpoint_config(index.path)
    stack, why = _stack(index, cfg)
    arch = ""
    if cfg is not None:
        arch = f"{(cfg.get('architectures') or ['?'])[0]} ({cfg.get('model_type', '?')})"
    lines = [
        f"checkpoint: {index.path}",
        f"format: {index.note or index.format}, {len(index.files)} file(s): "
        + ", ".join(f.name for f in index.files[:4])
        + (" ..." if len(index.files) > 4 else ""),
        *([f"architecture: {arch}"] if arch else []),
        f"tensors: {len(refs)} ({_dtypes(refs)}); parameters: {params:,}; "
        f"decoder layers: {stack.count if stack else '?'}; tensor bytes: {human_bytes(index.nbytes)}",
        stack.describe() if stack else f"decoder layers: cannot tell ({why})",
        _tied(index, cfg),
        *_listing(refs, show_all, stack),
    ]
    return "\n".join(lines)


def _tied(index: CheckpointIndex, cfg: dict[str, Any] | None) -> str:
    """Whether the output head shares the input embeddings (no head tensor of its own)."""
    heads = [n for n in index.tensors if n.endswith(("lm_head.weight", "embed_out.weight"))]
    said = (cfg or {}).get("tie_word_embeddings")
    if heads:
        return f"output head: {heads[0].removesuffix('.weight')} (untied)"
    return "output head: none stored (tied to the input embeddings" + (
        ", as config.json says)" if said else ")"
    )


def _stack(index: CheckpointIndex, cfg: dict[str, Any] | None) -> tuple[LayerStack | None, str]:
    """The checkpoint's decoder layers (in its family's order), or why they can't be told
    from its names."""
    try:
        return replace(find_stack(index.tensors, str(index.path)), order=order_of(cfg)), ""
    except LazyMergeError as e:
        return None, str(e).split(": ", 1)[-1]


def _adapter(path: Path, show_all: bool) -> str:
    adapter = LoraAdapter.open(path)
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    terms = sorted(adapter.terms, key=lambda t: natural_key(t.target))
    ranks = Counter(t.rank for t in terms if t.rank)
    modules = sorted({t.target.removesuffix(".weight").rsplit(".", 1)[-1] for t in terms})
    refs = [ref for t in terms for ref in t.refs()]
    lines = [
        f"adapter: {path} ({next(iter(refs)).file.name if refs else 'no tensors'})",
        f"LoRA: r {', '.join(f'{r} (x{n})' for r, n in ranks.most_common())}; "
        f"lora_alpha {config.get('lora_alpha')}; rsLoRA {bool(config.get('use_rslora'))}; "
        f"base model {config.get('base_model_name_or_path') or 'not recorded'}",
        f"targets: {', '.join(modules)} ({len(terms)} base tensors, {_dtypes(refs)})",
        "touches:",
    ]
    shown = terms if show_all else terms[:SHORT_LISTING]
    lines += _table([
        [t.target, str(list(t.shape)), t.kind + (" + DoRA" if t.magnitude else ""), f"scale {t.scale:g}"]
        for t in shown
    ])  # fmt: skip
    if len(shown) < len(terms):
        lines.append(f"  ... {len(terms) - len(shown)} more (--all lists every tensor)")
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    """Rows of cells, each column padded to its widest cell, two spaces between."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)] if rows else []
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
