"""What a plan does with the tokenizer: which one the output gets, how many tokens it
adds, how each model's vocabulary rows are aligned to it, and which chat template."""

from __future__ import annotations

from typing import Any

import numpy as np

from lazymerge.meaning.vocab import ABSENT
from lazymerge.plan.model import MergePlan, PlannedTensor
from lazymerge.recipe.tokenizer import TEMPLATES, builtin_template


def tokenizer_json(plan: MergePlan) -> dict[str, Any] | None:
    """The tokenizer's decisions as data (None: the base's files, rows as they are)."""
    tok, template = plan.tokenizer, plan.chat_template
    if tok is None and template is None:
        return None
    label = template_label(template)
    if label is not None and plan.recipe.chat_template == "auto":
        label = f"auto, the inputs' most common: {label}"
    data: dict[str, Any] = {"chat_template": label}
    if tok is not None:
        data |= {"source": tok.source, "tokens": tok.size, "added": tok.added, "rows": tok.rows}
        data["aligned"] = {role: n for role, n in _aligned(plan).items()}
    return data


def tokenizer_lines(plan: MergePlan) -> list[str]:
    """One line for the tokenizer, one per model whose rows are realigned, one for the
    template."""
    data = tokenizer_json(plan)
    if data is None:
        return []
    lines = []
    if "source" in data:
        source = data["source"]
        whose = {"union": "the union of the models' vocabularies", "base": "the base's"}
        to = " to the base's" if source in whose else ""
        added = f" ({data['added']} added{to})" if data["added"] else ""
        padded = f"; {data['rows']} rows (padded)" if data["rows"] > data["tokens"] else ""
        lines.append(
            f"tokenizer: {whose.get(source, source)}, {data['tokens']} tokens{added}{padded}"
        )
        for role, (moved, defaults) in data["aligned"].items():
            lines.append(
                f"  {role}: vocabulary rows aligned by token ({moved} moved, "
                f"{defaults} from the default rule)"
            )
    if data["chat_template"] is not None:
        lines.append(f"chat template: {data['chat_template']}")
    return lines


def template_label(text: str | None) -> str | None:
    """A built-in's name, or how long the given template is."""
    if text is None:
        return None
    name = next((n for n in TEMPLATES if builtin_template(n) == text), None)
    return f"{name} (built-in)" if name else f"Jinja text, {len(text)} characters"


def _aligned(plan: MergePlan) -> dict[str, tuple[int, int]]:
    """Per model read by token in the first vocabulary tensor: rows not at their own
    index, and rows made by the default rule."""
    first = next((t for t in plan.tensors if _gathered(t)), None)
    if first is None:
        return {}
    out = {}
    for inp in first.inputs:
        if inp.gather is None:
            continue
        own = inp.gather.own
        moved = int(((own != np.arange(len(own))) & (own >= 0)).sum())
        out[inp.role] = (moved, int((own == ABSENT).sum()))
    return out


def _gathered(t: PlannedTensor) -> bool:
    return any(i.gather is not None for i in t.inputs)
