"""A merge that would quietly do nothing is refused: an adapter that changes no tensor,
an untrained LoRA, a gradient rule that decides no tensor, an output equal to the base.

Checked on the plan, before anything is written. Everything but the untrained LoRA comes
from headers; that one reads the adapter's factors until it finds a non-zero byte (an
adapter that was trained: after its first few bytes; an untrained one: all of them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from lazymerge.errors import NoopError
from lazymerge.meaning.adapters import REPLACE, LoraTerm
from lazymerge.plan.model import AdapterUse, MergePlan
from lazymerge.read.readahead import extent
from lazymerge.read.tensorref import TensorRef

ALLOW = "--allow-noop merges anyway"
CHUNK = 16 * 2**20  # bytes of a factor read at a time while looking for a non-zero value


def refuse_noop(plan: MergePlan) -> None:
    """NoopError with the first reason the merge would do less than its recipe says."""
    reason = next(noop_reasons(plan), None)
    if reason is not None:
        raise NoopError(f"{reason}; {ALLOW}")


def noop_reasons(plan: MergePlan) -> Iterator[str]:
    """Why the merge would not do what its recipe says, most specific first."""
    for use in plan.adapters:
        yield from _adapter_reasons(plan, use)
    decided = {t.rule for t in plan.tensors}
    for i, rule in enumerate(plan.recipe.gradient):
        if i not in decided:
            what = f"filter {rule.filter!r}" if rule.filter is not None else "no filter"
            yield (
                f"gradient[{i}] ({what}) decides no tensor: no tensor name contains its "
                "filter, or an earlier rule takes every one it matches"
            )
    founding = plan.recipe.merge is None  # N-model merges: their methods decide (nmodel.py)
    if founding and all(t.ratio == 0 and not any(i.terms for i in t.inputs) for t in plan.tensors):
        yield (
            "the output would be the base's weights: every tensor takes ratio 0 and no "
            "adapter applies"
        )


def _adapter_reasons(plan: MergePlan, use: AdapterUse) -> Iterator[str]:
    where = f"{use.spec.path}: LoRA on {use.role}"
    if use.terms == 0:
        yield f"{where} holds no tensors; it changes nothing"
        return
    terms = [
        term
        for t in plan.tensors
        for i in t.inputs
        if i.role == use.role
        for term in i.terms
        if term.adapter == use.path
    ]
    if not terms:
        share = {"other": "0 of the other", "base": "all of the other"}.get(use.role, "none of it")
        yield f"{where} changes nothing: every tensor it targets takes {share}"
    elif all(_zero_delta(term) for term in terms):
        yield (
            f"{where} looks untrained: each of its deltas has an all-zero factor (PEFT "
            "initialises lora_B to zeros), so it changes nothing"
        )


def _zero_delta(term: LoraTerm) -> bool:
    """A delta B @ A that is exactly zero, and no replacement or DoRA magnitude besides
    (a trained magnitude rescales rows even with a zero delta)."""
    if term.kind == REPLACE or term.magnitude is not None:
        return False
    return _zero(term.b) or _zero(term.a)


def _zero(ref: TensorRef | None) -> bool:
    """Whether every byte of a factor is zero (so every value is +0.0), read a chunk at a
    time until the first non-zero one. Plain reads and numpy: `plan` loads no torch."""
    if ref is None:
        return False
    fd = os.open(ref.file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pos, end = ref.offset, ref.offset + extent(ref)
        while pos < end:
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk or np.frombuffer(chunk, dtype=np.uint8).any():
                return False
            pos += len(chunk)
    finally:
        os.close(fd)
    return True
