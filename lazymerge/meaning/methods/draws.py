"""Counter-based random numbers for the DARE and DELLA masks.

mergekit draws its masks from torch's global generator in execution order, so a mask
depends on every tensor drawn before it, on the device and on torch's kernels
(docs/methods.md, Randomness). lazymerge streams a tensor in blocks of rows, on a CPU or a
GPU, in threads or Ray workers; its masks must not depend on any of that. So an element's
number is a pure function of (seed, tensor name, model, flat element index): a
counter-based generator, cheap to evaluate at any index.

The generator, exactly (enough to reproduce any mask outside lazymerge):

- `key = stream_key(seed, tensor, model)`: BLAKE2b with `digest_size=8` and
  `person=b"lazymerge-draws"` over the UTF-8 bytes of `f"{seed}\\0{model}\\0{tensor}"`,
  read as a little-endian unsigned integer, its top bit cleared (a 63-bit key).
- Element `i` (0-based, flat row-major index) gets SplitMix64's (i+1)-th output from the
  state `key` (splitmix64.c's `next()` with `x = key`; Java's
  `new SplittableRandom(key).nextLong()`), all arithmetic mod 2^64:

      z = key + (i + 1) * 0x9E3779B97F4A7C15
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
      z = (z ^ (z >> 27)) * 0x94D049BB133111EB
      z = z ^ (z >> 31)

- Its uniform is `u = (z >> 40) * 2^-24`: the top 24 bits, a float32 in [0, 1), exact.
- `keep_mask` keeps the element where `u < p`, compared in float32, so a probability `p`
  keeps with chance ceil(p * 2^24) / 2^24 exactly. (A scalar `p` is compared as that
  integer against the top 24 bits, the same test without the conversion: 40 % less time.)

torch has no unsigned 64-bit arithmetic on every device, so it runs in int64: products
wrap mod 2^64 on the CPU and CUDA alike, and `>>` on int64 is arithmetic, so each shift is
masked to the logical one. The top 24 bits of `z ^ (z >> 31)` are those of `z`, so the
last step is skipped. Indices are evaluated in chunks of `CHUNK` to keep the int64
temporaries small; each number depends on its index only, so chunks change nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, odd
MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # Stafford's "Mix13" multipliers
SHIFTS = (30, 27)
# Elements per chunk: two 512 KiB int64 temporaries, in a core's L2 cache through the
# dozen passes of the mixer (1 << 20 spilled to memory: 73 M numbers/s on one thread
# here; 1 << 16: 312 M/s; 1 << 12: 114 M/s, per-call overhead).
CHUNK = 1 << 16
_MOD = 1 << 64
Fill = Callable[..., None]  # (chunk, key, its first flat index, extra ints) -> None


def stream_key(seed: int, tensor: str, model: int) -> int:
    """The 63-bit key of one model's draws for one tensor under one seed (module
    docstring); a stable hash, the same in every process, unlike Python's `hash`."""
    text = f"{seed}\0{model}\0{tensor}".encode()
    digest = hashlib.blake2b(text, digest_size=8, person=b"lazymerge-draws").digest()
    return int.from_bytes(digest, "little") & (_MOD // 2 - 1)


def uniforms(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1), multiples of 2^-24, of flat element indices
    start .. start + count - 1 under `key`: the same numbers on every device and for
    every split of the indices.

    Example: `uniforms(k, 0, 10)` equals `torch.cat([uniforms(k, 0, 3), uniforms(k, 3, 7)])`.
    """
    out = torch.empty(_checked("uniforms", start, count), dtype=torch.float32, device=device)
    return _chunked(out, key, start, _fill)


def keep_mask(
    key: int,
    start: int,
    shape: Sequence[int],
    p: float | torch.Tensor,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """True where an element is kept: `uniforms(...) < p` for the `prod(shape)` elements
    from flat index `start`, in `shape`. `p` is a probability or a tensor of them
    broadcastable to `shape` (DELLA: one per element), compared in float32 (a Python float
    is rounded to float32); a tensor `p` chooses the device."""
    if isinstance(p, torch.Tensor):
        u = uniforms(key, start, math.prod(shape), p.device).view(tuple(shape))
        return u < p
    count = _checked("keep_mask", start, math.prod(shape))
    out = torch.empty(count, dtype=torch.bool, device=device)
    return _chunked(out, key, start, _fill_keep, _below(p)).view(tuple(shape))


def _checked(what: str, start: int, count: int) -> int:
    """`count`, once it and `start` are known to be indices (>= 0)."""
    if start < 0 or count < 0:
        raise ValueError(f"{what}: start {start} and count {count} must be >= 0")
    return count


def _chunked(out: torch.Tensor, key: int, start: int, fill: Fill, *args: int) -> torch.Tensor:
    """`out` filled CHUNK elements at a time by `fill(chunk, key, first index, *args)`."""
    for at in range(0, out.numel(), CHUNK):
        fill(out[at : at + CHUNK], key, start + at, *args)
    return out


def _below(p: float) -> int:
    """How many of the 2^24 uniforms' numerators k (u = k * 2^-24) are kept, `u < p` with
    p rounded to float32: k < ceil(p * 2^24), exact (p * 2^24 only moves the exponent)."""
    p32 = float(torch.tensor(p, dtype=torch.float32))
    if math.isnan(p32) or p32 <= 0:
        return 0
    return min(math.ceil(p32 * 2**24), 1 << 24)


def _fill_keep(out: torch.Tensor, key: int, first: int, below: int) -> None:
    """`out[j]` = whether index `first + j`'s uniform numerator is under `below`: compared
    as integers (the top 24 bits of z, unsigned, under `below` iff z < below * 2^40),
    without the uniform's float conversion and scaling."""
    if below >= 1 << 24 or below == 0:
        out.fill_(below > 0)
        return
    z, _ = _mixed(out.numel(), key, first, out.device)
    # unsigned a < b as signed ints: both with the top bit flipped
    flip = -(1 << 63)
    torch.lt(z.bitwise_xor_(flip), _signed((below << 40) ^ (1 << 63)), out=out)


def _mixed(
    count: int, key: int, first: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """SplitMix64's z of indices first .. first + count - 1 before the last xor-shift
    (its top 24 bits are the final ones), in int64; and a scratch tensor of its size."""
    z = torch.arange(count, dtype=torch.int64, device=device)
    z.mul_(_signed(GAMMA)).add_(_signed(key + (first + 1) * GAMMA))
    t = torch.empty_like(z)
    for shift, mix in zip(SHIFTS, MIX, strict=True):
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)  # the logical shift's zero top bits
        z.bitwise_xor_(t).mul_(_signed(mix))
    return z, t


def _fill(out: torch.Tensor, key: int, first: int) -> None:
    """`out[j]` = the uniform of index `first + j` (module docstring), in int64."""
    z, t = _mixed(out.numel(), key, first, out.device)
    torch.bitwise_right_shift(z, 40, out=t)
    out.copy_(t.bitwise_and_(0xFFFFFF)).mul_(2.0**-24)


def _signed(x: int) -> int:
    """`x` mod 2^64 as the int64 with the same bits (torch's scalars are signed)."""
    x %= _MOD
    return x - _MOD if x >= _MOD // 2 else x
