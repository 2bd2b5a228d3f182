"""Human-readable summaries of a plan and of a finished merge (stdout)."""

from __future__ import annotations

from lazymerge.engine import MergeResult
from lazymerge.plan import COMPUTE, COPY_BASE, COPY_OTHER, MergePlan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def ratio_table(plan: MergePlan) -> list[str]:
    """One line per decoder layer, then the tensors outside the layers."""
    if plan.other is None:
        return []
    ratios = plan.layer_ratios()
    lines = ["layer  ratio of other"]
    for layer in sorted(k for k in ratios if k is not None):
        lines.append(f"{layer:>5}  " + ", ".join(f"{r:.4f}" for r in ratios[layer]))
    if None in ratios:
        lines.append(
            "other  "
            + ", ".join(f"{r:.4f}" for r in ratios[None])
            + "  (embeddings, norm, lm_head)"
        )
    return lines


def inputs(plan: MergePlan) -> list[str]:
    """Which checkpoint format each model was read from, and what was left out."""
    lines = []
    for role, index in (("base", plan.base), ("other", plan.other)):
        if index is not None:
            lines.append(f"{role}: {index.path} ({index.note or index.format})")
    if plan.dropped:
        lines.append(
            f"dropped {len(plan.dropped)} rotary_emb.inv_freq buffers of the base "
            "(derived from the config; transformers recomputes them)"
        )
    return lines


def summary(plan: MergePlan, result: MergeResult) -> str:
    actions = [t.action for t in plan.tensors]
    loras = sum(len(t.base_loras) + len(t.other_loras) for t in plan.tensors)
    lines = [
        *inputs(plan),
        *ratio_table(plan),
        f"tensors: {len(actions)} ({actions.count(COMPUTE)} computed, "
        f"{actions.count(COPY_BASE)} copied from base, {actions.count(COPY_OTHER)} from other); "
        f"{loras} LoRA terms applied",
        f"wrote {len(result.shards)} shard(s) to {result.out}:",
        *(f"  {s.name}  {human_bytes(s.size)}  sha256 {s.sha256[:16]}" for s in result.shards),
        f"read {human_bytes(result.bytes_read)}, wrote {human_bytes(result.bytes_written)} "
        f"in {result.seconds:.2f} s; peak memory (RSS) {human_bytes(result.peak_rss)}",
    ]
    return "\n".join(lines)
