"""The TIES family's sign vote, and masks as numbers.

mergekit's `get_mask("sum")` — an input agrees where its sign is that of the sum over
the inputs (±0 counts as +) — and the masked sums after it, the same bits as mergekit's in
about half the time: TIES' (`sign_vote`) and SCE's (`erased_sums`); `as_mask`, a bool mask
as 1 and 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazymerge.meaning.methods.exact import wide

if TYPE_CHECKING:
    import torch


def as_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as `dtype`'s 1 and 0, the values `keep.to(dtype)` gives, through uint8
    (and float32 for fp16): torch's CPU conversions from bool are 3-6x slower (a 13B
    row chunk, 261k elements: bool to fp16 400 us, uint8 to fp32 to fp16 120 us)."""
    import torch

    u8 = keep.view(torch.uint8)
    return u8.to(torch.float32).to(dtype) if dtype == torch.float16 else u8.to(dtype)


def sign_vote(deltas: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' vote over the weighted task vectors `deltas` ([n, ...], in d): mergekit's
    `(deltas * mask).sum(0)` and `(weights * mask).sum(0)` (mask: get_mask("sum") of
    `deltas`) in d, the latter with its zeros set to 1 as mergekit sets them next. The
    same bits (a NaN's payload aside) at about half the time: the work in fp32 (fp64 for
    fp64), where torch's CPU kernels are fast, with the mask as 1.0/+0.0, never bool. It
    holds because torch sums fp16/bf16 in fp32, in input order, rounding once (a sum of
    d's values never rounds to ±0, so its sign is the rounded one's); products by 1 or +0
    are exact in either dtype; the int8 mask gives the same mask."""
    import torch

    d = deltas.dtype
    x, mask = _agreement(deltas)
    mixed = x.mul_(mask).sum(dim=0).to(d)
    divisor = mask.mul_(weights.to(x.dtype)).sum(dim=0)
    # mergekit's next line, `divisor[divisor == 0] = 1`, here before rounding (a nonzero
    # sum of d's values never rounds to ±0): ±0 + 1.0 is 1, x + 0.0 is x. 10x faster than
    # a masked fill, whose CPU kernel takes ~2 ms a 13B row chunk in any dtype.
    zero = torch.eq(divisor, 0, out=torch.empty_like(divisor))
    return mixed, divisor.add_(zero).to(d)


def erased_sums(tvs: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SCE's vote: mergekit's `erased = weights * mask`, then `(tvs * erased).sum(0)` and
    `erased.sum(0)`, mask: get_mask("sum") of the unweighted task vectors, in d.
    The same bits (a NaN's payload aside) in fp32, in mergekit's order: w·m is w or ±0
    exactly, τ·(w·m) of two d values is exact in fp32 (torch's d product is that fp32
    product, rounded), so each product is rounded to d once before the sum, as
    mergekit's is."""
    d = tvs.dtype
    x, mask = _agreement(tvs)
    erased = mask.mul_(weights.to(x.dtype))
    products = x.mul_(erased)
    if products.dtype != d:
        products = products.to(d).to(x.dtype)
    return products.sum(dim=0).to(d), erased.sum(dim=0).to(d)


def _agreement(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`deltas` in fp32 (fp64 stays; the caller gives `deltas` up where that is itself),
    get_mask("sum") of `deltas` as 1.0/+0.0 in that dtype)."""
    import torch

    x = deltas.to(wide(deltas.dtype))
    majority = (x.sum(dim=0) >= 0).to(x.dtype).mul_(2).sub_(1)  # d's sum, before rounding
    mask = torch.sign(x).mul_(majority).gt_(0)  # NaN and ±0 deltas: +0.0
    return x, mask
