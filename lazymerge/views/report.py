"""What a plan will do and what a merge did: tables for people, JSON for machines.

Everything here is derived from a MergePlan (headers only) and, for a finished merge,
its MergeResult; `plan`, `merge`, the plot and the model card all read the same rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lazymerge.plan.model import (
    COMPUTE,
    COPY,
    COPY_BASE,
    COPY_OTHER,
    MergePlan,
    PlannedTensor,
    Role,
)
from lazymerge.recipe.spec import DTYPE_LABELS, GradientRule
from lazymerge.run.budget import INTERPRETER, estimate_peak
from lazymerge.views import nmodel
from lazymerge.views.tokenizer import tokenizer_json, tokenizer_lines
from lazymerge.write.safetensors import build_header

if TYPE_CHECKING:  # a merge's result: run.merge brings torch, which plan's views need not
    from lazymerge.run.merge import MergeResult


@dataclass(frozen=True)
class LayerRow:
    """One decoder layer (layer None: embeddings, final norm, lm_head)."""

    layer: int | None
    ratios: dict[str, float]  # rule label -> fraction of `other`
    computed: int
    copied: int
    loras: dict[str, float]  # "other: ADAPTER" -> effective weight (LoRA weight x its share)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def layer_rows(plan: MergePlan) -> list[LayerRow]:
    groups: dict[int | None, list[PlannedTensor]] = {}
    for t in plan.tensors:
        groups.setdefault(plan.stack.layer_of(t.name), []).append(t)
    keys = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
    return [_row(plan, k, groups[k]) for k in keys]


def _row(plan: MergePlan, layer: int | None, tensors: list[PlannedTensor]) -> LayerRow:
    rules = plan.recipe.gradient
    by_rule: dict[int, float] = {}  # rule index (len(rules): no rule) -> ratio
    loras: dict[str, float] = {}
    for t in tensors:
        by_rule.setdefault(len(rules) if t.rule is None else t.rule, t.ratio)
        shares: tuple[tuple[Role, float], ...] = (("base", 1 - t.ratio), ("other", t.ratio))
        for side, share in shares:
            for term in t.terms(side):
                key = f"{side}: {term.adapter.name}"
                loras[key] = max(loras.get(key, 0.0), term.weight * share)
    ratios = {_label(rules, i): by_rule[i] for i in sorted(by_rule)}
    computed = sum(t.action == COMPUTE for t in tensors)
    return LayerRow(layer, ratios, computed, len(tensors) - computed, loras)


def _label(rules: Sequence[GradientRule], i: int) -> str:
    if i == len(rules):
        return "no rule"
    return "all" if len(rules) == 1 else rules[i].filter or f"rule {i}"


def _ratio_text(ratios: dict[str, float]) -> str:
    if list(ratios) == ["all"]:
        return f"{ratios['all']:.4f}"
    return ", ".join(f"{label} {r:.4f}" for label, r in ratios.items())


def ratio_table(plan: MergePlan) -> list[str]:
    """One line per decoder layer, then the tensors outside the layers."""
    rows = layer_rows(plan)
    texts = [_ratio_text(r.ratios) for r in rows]
    w = max(len("other"), *map(len, texts))
    lines = [
        f"{'layer':>5}  {'other':<{w}}  {'computed':>8}  {'copied':>6}  LoRA (effective weight)"
    ]
    for row, text in zip(rows, texts, strict=True):
        name = "rest" if row.layer is None else str(row.layer)
        loras = ", ".join(f"{k} {v:.4f}" for k, v in row.loras.items() if v) or "-"
        lines.append(f"{name:>5}  {text:<{w}}  {row.computed:>8}  {row.copied:>6}  {loras}")
    return lines


def inputs(plan: MergePlan) -> list[str]:
    """Which checkpoint format each model was read from, and what was left out."""
    lines = []
    if plan.recipe.merge is not None:
        lines += [nmodel.headline(plan), *nmodel.models(plan), *nmodel.slice_map(plan)]
    for role, index in (("base", plan.base), ("other", plan.other)):
        if index is not None and plan.recipe.merge is None:
            lines.append(f"{role}: {index.path} ({index.note or index.format})")
    lines.append(plan.stack.describe())
    lines += tokenizer_lines(plan)
    lines += list(plan.notes)
    if plan.dropped:
        lines.append(
            f"dropped {len(plan.dropped)} rotary_emb.inv_freq buffers of the base "
            "(derived from the config; transformers recomputes them)"
        )
    return lines


def _counts(plan: MergePlan) -> str:
    actions = [t.action for t in plan.tensors]
    loras = sum(len(i.terms) for t in plan.tensors for i in t.inputs)
    if plan.recipe.merge is not None:
        copied = f"{actions.count(COPY) + actions.count(COPY_BASE)} copied as they are"
    else:
        copied = (
            f"{actions.count(COPY_BASE)} copied from base, {actions.count(COPY_OTHER)} from other"
        )
    return (
        f"tensors: {len(actions)} ({actions.count(COMPUTE)} computed, {copied}); "
        f"{loras} LoRA terms applied"
    )


def shard_sizes(plan: MergePlan) -> list[int]:
    """Each output shard's file size, header included, as the writer will make it."""
    if plan.recipe.output.format == "gguf":  # its header holds the tokenizer: build it
        from lazymerge.write.gguf import gguf_headers

        headers = gguf_headers(plan, "merge")
        return [len(h) + s.data_size for h, s in zip(headers, plan.shards, strict=True)]
    return [len(build_header(s.tensors)) + s.data_size for s in plan.shards]


def gguf_lines(plan: MergePlan) -> list[str]:
    """A GGUF output: its quant, how many tensors of each type, the permuted ones."""
    encodings = [t.encoding for t in plan.tensors if t.encoding is not None and not t.encoding.part]
    if not encodings:
        return []
    types = Counter(e.type_name for e in encodings)
    permuted = sum(e.heads is not None for e in encodings)
    listing = ", ".join(f"{n} {k}" for k, n in types.most_common())
    return [
        f"GGUF {plan.recipe.output.quant}: {listing}; Q/K rows permuted in {permuted} "
        f"(llama.cpp's layout){'; no tokenizer' if not plan.recipe.output.tokenizer else ''}"
    ]


def plan_text(plan: MergePlan, budget: int) -> str:
    sizes = shard_sizes(plan)
    peak = estimate_peak(plan, budget)
    lines = [
        *inputs(plan),
        *(ratio_table(plan) if plan.recipe.merge is None else nmodel.method_table(plan)),
        _counts(plan),
        *gguf_lines(plan),
        f"read {human_bytes(plan.bytes_to_read)}, write {human_bytes(sum(sizes))} "
        + (
            ("in one GGUF file:" if len(sizes) == 1 else f"in {len(sizes)} GGUF split files:")
            if plan.recipe.output.format == "gguf"
            else f"in {len(sizes)} shard(s) of at most {human_bytes(plan.recipe.output.shard_limit)}:"
        ),
        *(
            f"  {s.name}  {human_bytes(n)}  ({len(s.tensors)} tensors)"
            for s, n in zip(plan.shards, sizes, strict=True)
        ),
        f"memory: working set {human_bytes(peak - INTERPRETER)} at --max-memory {human_bytes(budget)}, "
        f"+ ~{human_bytes(INTERPRETER)} for Python and torch: about {human_bytes(peak)} peak",
    ]
    return "\n".join(lines)


def plan_json(plan: MergePlan, budget: int) -> dict[str, Any]:
    sizes = shard_sizes(plan)
    return {
        "base": {"path": str(plan.base.path), "format": plan.base.format},
        "other": {"path": str(plan.other.path), "format": plan.other.format}
        if plan.other
        else None,
        "layers": [
            {
                "layer": r.layer,
                "ratios": r.ratios,
                "computed": r.computed,
                "copied": r.copied,
                "loras": r.loras,
            }
            for r in layer_rows(plan)
        ],
        "layer_stack": {
            "prefix": plan.stack.prefix,
            "layers": plan.stack.count,
            "not_decoder_layers": list(plan.stack.towers),
        },
        "tensors": [_tensor_json(plan, t) for t in plan.tensors],
        "dropped": list(plan.dropped),
        "tokenizer": tokenizer_json(plan),
        "notes": list(plan.notes),
        "shards": [
            {"name": s.name, "size": n, "tensors": len(s.tensors)}
            for s, n in zip(plan.shards, sizes, strict=True)
        ],
        "bytes_to_read": plan.bytes_to_read,
        "bytes_to_write": sum(sizes),
        "max_memory": budget,
        "estimated_peak_rss": estimate_peak(plan, budget),
    }


def _tensor_json(plan: MergePlan, t: PlannedTensor) -> dict[str, Any]:
    decision = t.describe()
    return {
        "name": t.name,
        "action": decision["action"],
        "ratio": t.ratio,
        "method": t.method.describe() if t.method is not None else None,
        "rule": t.rule,
        "dtype": DTYPE_LABELS.get(t.dtype, t.dtype),
        "shape": list(t.shape),
        "shard": plan.shards[t.shard].name,
        "offset": t.offset,
        "nbytes": t.nbytes,
        "base_loras": decision["base_loras"],
        "other_loras": decision["other_loras"],
        # An N-model merge's tensor: its parameters, LoRAs by input, passes (as recorded).
        **{k: decision[k] for k in ("parameters", "loras", "passes") if k in decision},
    }


def summary(plan: MergePlan, result: MergeResult) -> str:
    if result.already_complete:
        return (
            f"{result.out}: already complete (this recipe, these inputs); nothing rewritten "
            f"({len(result.shards)} shard(s), {human_bytes(result.bytes_kept)}; "
            f"lazymerge verify {result.out} rehashes them)"
        )
    kept = set(result.kept)
    done = f"wrote {len(result.shards) - len(kept)} shard(s)"
    if kept:
        done += f", kept {len(kept)} from the interrupted attempt,"
    lines = [
        *inputs(plan),
        *(ratio_table(plan) if plan.other is not None else []),
        _counts(plan),
        f"{done} to {result.out}:",
        *(
            f"  {s.name}  {human_bytes(s.size)}  sha256 {s.sha256[:16]}"
            + ("  (kept)" if s.name in kept else "")
            for s in result.shards
        ),
        f"read {human_bytes(result.bytes_read)}, wrote {human_bytes(result.bytes_written)}"
        + (f" (kept {human_bytes(result.bytes_kept)})" if kept else "")
        + f" in {result.seconds:.2f} s; peak memory (RSS) {human_bytes(result.peak_rss)}",
    ]
    return "\n".join(lines)


def result_json(result: MergeResult) -> dict[str, Any]:
    """`merge --json`: bytes_written counts this run's shards only; kept shards (--resume)
    are named in `kept` and counted in bytes_kept."""
    return {
        "out": str(result.out),
        "already_complete": result.already_complete,
        "seconds": round(result.seconds, 3),
        "peak_rss": result.peak_rss,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "bytes_kept": result.bytes_kept,
        "kept": list(result.kept),
        "shards": [{"name": s.name, "size": s.size, "sha256": s.sha256} for s in result.shards],
    }
