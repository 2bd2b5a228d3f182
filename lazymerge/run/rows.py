"""An input's rows as a method sees them: float32, with the model's adapter terms
applied in place (the ' of DESIGN §2), loaded only when the method asks.

Kinds of term (meaning/adapters.py), applied in the plan's order: REPLACE
(`W <- W + weight * (S - W)`), LORA (`+= scale * B @ A`), LORA_T (its transpose), LORA_X
and LORA_XT (a fused 3-D expert tensor, whose rows are experts: each expert's own delta,
or its transpose), and DoRA's row rescaling after a delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lazymerge.meaning.adapters import LORA, LORA_T, LORA_X, LORA_XT, REPLACE, LoraTerm
from lazymerge.plan.model import Input, PlannedTensor
from lazymerge.read.mapped import DTYPES, MappedReader
from lazymerge.read.tensorref import TensorRef
from lazymerge.run.budget import LORA_ROWS
from lazymerge.run.device import Scratch
from lazymerge.run.gather import gather_rows

# What a term needs whole, read once per tensor, in fp32: (A, A) for LORA, (A, B.T) for
# LORA_T, each expert's (lhs, rhs) stacked for LORA_X(T); None for REPLACE.
Factor = tuple[torch.Tensor, torch.Tensor] | None
EXPERTS = (LORA_X, LORA_XT)


@dataclass(frozen=True)
class Source:
    """Where rows come from: the maps, and the device buffers they are computed in."""

    reader: MappedReader
    scratch: Scratch

    def factors(self, inp: Input) -> list[Factor]:
        """Per term of `inp`, what is read once per tensor in fp32: A (LORA), A and B.T
        (LORA_T), every expert's two factors (LORA_X, LORA_XT)."""
        out: list[Factor] = []
        for term in inp.terms:
            if term.kind == REPLACE or term.b is None:
                out.append(None)
                continue
            if term.kind in EXPERTS:
                out.append(self._experts(term))
                continue
            a = self._whole(term.a)
            bt = self._whole(term.b).T if term.kind == LORA_T else a
            out.append((a, bt))
            self.reader.release(term.a)
        return out

    def _experts(self, term: LoraTerm) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs [E, rows, r], rhs [E, r, cols]), each contiguous in fp32, with expert e's
        slice of the target changed by `lhs[e] @ rhs[e]`: B[:, e::E] @ A[e·r:(e+1)·r]
        for (E, out, in) (LORA_X), its transpose for (E, in, out) (LORA_XT)."""
        assert term.b is not None  # LORA_X(T) terms have both factors
        n = term.experts
        a = self.reader.rows(term.a, 0, term.a.rows)  # [r·E, in]
        b = self.reader.rows(term.b, 0, term.b.rows)  # [out, r·E]
        a3 = a.reshape(n, -1, a.shape[1])  # [E, r, in]: expert e's rows of A
        b3 = b.reshape(b.shape[0], -1, n).permute(2, 0, 1)  # [E, out, r]: B[:, e::E]
        lhs, rhs = (b3, a3) if term.kind == LORA_X else (a3.transpose(1, 2), b3.transpose(1, 2))
        factor = (self._laid(lhs), self._laid(rhs))
        self.reader.release(term.a)
        self.reader.release(term.b)
        return factor

    def _laid(self, view: torch.Tensor) -> torch.Tensor:
        """A copy of a mapped view in fp32, on the device, laid out row-major."""
        return view.to(
            self.scratch.device, torch.float32, copy=True, memory_format=torch.contiguous_format
        )

    def _whole(self, ref: TensorRef) -> torch.Tensor:
        return self.scratch.put(self.reader.rows(ref, 0, ref.rows), torch.float32, copy=True)


@dataclass(frozen=True)
class TensorBlock:
    """Rows [start, stop) of output tensor `t` (implements meaning.methods.Block)."""

    source: Source
    t: PlannedTensor
    factors: Sequence[Sequence[Factor]]  # per input, per term
    start: int
    stop: int

    @property
    def shared(self) -> int:
        return max(0, min(self.stop, self.t.shared_rows) - self.start)

    def rows(self, i: int, n: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        inp = self.t.inputs[i]
        have = max(0, min(self.stop, inp.rows) - self.start)
        r1 = self.start + (have if n is None else min(n, have))
        span, slot = (self.start, r1), str(i)
        direct = inp.ref.is_float and not inp.terms and inp.gather is None
        if dtype in (None, torch.float32) or not direct:
            rows = _side(self.source, inp, self.factors[i], span, slot)
            return rows if dtype is None else rows.to(dtype)
        # No adapter: the stored values straight into `dtype`, the same values as through
        # fp32 (every float conversion here goes through fp32 or is exact), one pass fewer.
        return _stored(self.source, inp.ref, span, slot, dtype)


def _side(
    src: Source, inp: Input, factors: Sequence[Factor], span: tuple[int, int], slot: str
) -> torch.Tensor:
    """fp32 copy of rows [r0, r1) of one model's tensor with its adapters applied in place.

    (A non-float tensor, which the plan never blends, keeps its own dtype.)
    """
    ref, (r0, r1) = inp.ref, span
    dtype = torch.float32 if ref.is_float else DTYPES[ref.dtype]
    if inp.gather is not None:  # read by token; the plan gives such inputs no adapters
        acc = src.scratch.take(slot, (r1 - r0, *ref.shape[1:]), dtype)
        gather_rows(src.reader, src.scratch, acc, inp, r0)
        return acc
    acc = _stored(src, ref, span, slot, dtype)
    for term, factor in zip(inp.terms, factors, strict=True):
        if factor is None:
            _replace(src, acc, term, span)
        elif term.kind in EXPERTS:
            _add_experts(acc, term, factor, r0)
        else:
            _add_delta(src, acc, term, factor, span)
        if term.magnitude is not None:  # DoRA: rescale each row to its magnitude
            m = src.scratch.put(src.reader.rows(term.magnitude, r0, r1), torch.float32)
            acc.mul_((m / acc.norm(dim=1)).unsqueeze(1))
    return acc


def _stored(
    src: Source, ref: TensorRef, span: tuple[int, int], slot: str, dtype: torch.dtype
) -> torch.Tensor:
    """Rows [r0, r1) of `ref` as stored, converted to `dtype` in scratch slot `slot` (a
    copy: the mapped view is read-only); their pages released."""
    r0, r1 = span
    acc = src.scratch.take(slot, (r1 - r0, *ref.shape[1:]), dtype)
    src.scratch.fill(acc, src.reader.rows(ref, r0, r1))
    src.reader.release(ref, r0 * ref.row_nbytes, r1 * ref.row_nbytes)
    return acc


def _replace(src: Source, acc: torch.Tensor, term: LoraTerm, span: tuple[int, int]) -> None:
    """W <- W + weight * (S - W): S itself at weight 1."""
    r0, r1 = span
    new = src.scratch.put(src.reader.rows(term.a, r0, r1))
    if term.scale == 1:
        acc.copy_(new)
    else:
        acc.mul_(1 - term.scale).add_(new.to(torch.float32, copy=True).mul_(term.scale))
    src.reader.release(term.a, r0 * term.a.row_nbytes, r1 * term.a.row_nbytes)


def _add_delta(
    src: Source,
    acc: torch.Tensor,
    term: LoraTerm,
    factor: tuple[torch.Tensor, torch.Tensor],
    span: tuple[int, int],
) -> None:
    """acc += scale * (B @ A)[r0:r1] (or its transpose), in place, no full-size delta.

    A GEMM's rounding depends on its row count, so the product always runs over the
    same LORA_ROWS chunks whatever the block size.
    """
    r0, r1 = span
    if term.kind == LORA:
        assert term.b is not None
        lhs = src.scratch.put(src.reader.rows(term.b, r0, r1), torch.float32)  # B rows [n, r]
        rhs = factor[0]  # A [r, in]
    else:  # (B @ A).T rows r0:r1 = A[:, r0:r1].T @ B.T
        lhs, rhs = factor[0][:, r0:r1].T, factor[1]
    for q in range(0, r1 - r0, LORA_ROWS):
        acc[q : q + LORA_ROWS].addmm_(lhs[q : q + LORA_ROWS], rhs, alpha=term.scale)
    if term.kind == LORA and term.b is not None:
        src.reader.release(term.b, r0 * term.b.row_nbytes, r1 * term.b.row_nbytes)


def _add_experts(
    acc: torch.Tensor, term: LoraTerm, factor: tuple[torch.Tensor, torch.Tensor], r0: int
) -> None:
    """acc[i] += scale * lhs[e] @ rhs[e] for each expert e = r0 + i of the block, in place.

    Each expert's product is one GEMM of the same shape whatever the block, so its
    rounding does not depend on the block size; it adds into the expert's slice, so no
    delta is ever held.
    """
    lhs, rhs = factor
    for i in range(acc.shape[0]):
        acc[i].addmm_(lhs[r0 + i], rhs[r0 + i], alpha=term.scale)
