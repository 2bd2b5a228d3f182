"""GGUF tensor encodings, byte for byte as llama.cpp writes them (no imatrix), and the
type llama.cpp gives each tensor for a quant name (`tensor_type`).

(meaning/gguf_types.py says which type each tensor gets.) `encode` uses gguf-py's
quantizers where it has them (f16, bf16, q4_0, q4_1, q5_0, q5_1: tests/test_gguf_quants.py
checks them against llama.cpp's C), its own q8_0 (gguf-py's arithmetic, vectorised along
blocks: 2.3x faster, the same bytes), and here the
k-quants gguf-py can only dequantize, as ggml-quants.c's `quantize_row_q{4,5,6}_K_ref`
compute them: float32 throughout, in the C's order of operations, vectorised over every
sub-block of a chunk at once. A sub-block of 32 (or 16) values is a column of a
[32, blocks] array, so each of the C's running sums is `np.add.reduce(axis=0)`, which
adds the rows in order -- along a contiguous axis numpy would sum pairwise, and a float
sum's rounding depends on its order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from lazymerge.meaning.gguf_types import QUANTS, row_bytes

T = GGMLQuantizationType

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: v + _MAGIC holds round-half-even(v) in its low bits
_GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: a group below this is all zero
_CHUNK = 512  # super-blocks per pass: 512 KiB arrays, the fastest measured (256..2048)


def encode(rows: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """float32 rows [n, columns] -> uint8 [n, row_bytes]: llama.cpp's reference bytes
    (for f32 a view of `rows` itself)."""
    qtype = T(qtype)
    rows = np.ascontiguousarray(rows, dtype=F32)
    n, size = rows.shape[0], row_bytes(rows.shape[1], qtype)
    if qtype not in QUANTS.values():
        raise ValueError(f"no encoder for {qtype.name}; known: {', '.join(QUANTS)}")
    if qtype == T.F32 or rows.size == 0:
        return rows.view(np.uint8).reshape(n, size)
    kquant = _KQUANTS.get(qtype)
    with np.errstate(all="ignore"):  # zero, huge or tiny blocks: inf/nan as in the C
        if qtype == T.Q8_0:
            blocks32 = rows.reshape(-1, 32)
            out = np.empty((len(blocks32), 34), np.uint8)
            for i in range(0, len(blocks32), _Q8_CHUNK):
                out[i : i + _Q8_CHUNK] = _q8_0(blocks32[i : i + _Q8_CHUNK])
            return out.reshape(n, size)
        if kquant is None:
            data = np.ascontiguousarray(gguf_quants.quantize(rows, qtype)).view(np.uint8)
            if qtype in _ZERO_SIGNS:
                _zero_signs(data, rows, _ZERO_SIGNS[qtype])
            return data.reshape(n, size)
        blocks = rows.reshape(-1, 256)
        out = np.empty((len(blocks), GGML_QUANT_SIZES[qtype][1]), np.uint8)
        for i in range(0, len(blocks), _CHUNK):
            out[i : i + _CHUNK] = kquant(blocks[i : i + _CHUNK])
    return out.reshape(n, size)


# The 32-blocks whose scale (d) or min (m) gguf-py may write as the other zero: levels.
_ZERO_SIGNS = {T.Q4_0: 0, T.Q5_0: 0, T.Q4_1: 15, T.Q5_1: 31}


def _zero_signs(data: np.ndarray, rows: np.ndarray, nmax: int) -> None:
    """Make gguf-py's bytes the C's where they differ: the sign of a zero d or m. The
    C's max and min are the first values reaching them (a later -0 does not displace
    a 0), numpy's either zero; for q4_0/q5_0 the C's max starts as +0, so an all-zero
    block's d is +0/-8 = -0."""
    blocks = rows.reshape(-1, 32)
    head = data.reshape(len(blocks), -1)[:, :4].view(np.uint16)  # d, then m (q4_1, q5_1)
    if nmax == 0:
        maybe = np.nonzero((head[:, 0] & 0x7FFF) == 0)[0]
        head[maybe[~blocks[maybe].any(axis=1)], 0] = 0x8000
        return
    maybe = np.nonzero((head[:, 1] & 0x7FFF) == 0)[0]
    b = blocks[maybe]
    lo = np.take_along_axis(b, b.argmin(axis=1)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(b, b.argmax(axis=1)[:, None], axis=1)[:, 0]
    head[maybe, 0] = ((hi - lo) / F32(nmax)).astype(np.float16).view(np.uint16)
    head[maybe, 1] = lo.astype(np.float16).view(np.uint16)


# ---- q8_0 ----------------------------------------------------------------------------------

_Q8_CHUNK = 1024  # blocks per pass: 128 KiB arrays (measured 1.7 GB/s, gguf-py's 0.73)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref (what gguf-py's Q8_0 computes, 2.3x faster: a block is a
    column, so the max and the products run along contiguous rows): d = amax / 127 as
    float16, each value * (1 / d) rounded half away from zero (roundf)."""
    cols = np.ascontiguousarray(blocks.T)  # [32, b]
    d = np.abs(cols).max(axis=0) / F32(127)
    inv = np.zeros_like(d)
    np.divide(F32(1), d, out=inv, where=d != 0)
    cols *= inv
    q = cols + _MAGIC  # rounded half to even (|v| <= 127): its ties are the .5 values
    q -= _MAGIC
    ties = np.abs(cols - q) == F32(0.5)
    if ties.any():  # (rare but in most chunks of real weights: flat indices, one pass)
        at, flat = np.flatnonzero(ties), cols.reshape(-1)
        q.reshape(-1)[at] = flat[at] + np.copysign(F32(0.5), flat[at])  # roundf: away from 0
    out = np.empty((blocks.shape[0], 34), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.astype(np.int8).T.view(np.uint8)
    return out


# ---- the C's scalar helpers, elementwise ------------------------------------------------


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (round half to even) bit for bit, even where |v| >= 2**22."""
    bits: np.ndarray = (v + _MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _rint_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32, in place. Callers keep |v| < 2**22
    and finite, where np.rint (round half to even) is exactly nearest_int."""
    np.rint(v, out=v)
    return np.clip(v, F32(lo), F32(hi), out=v)  # ~3x faster than maximum + minimum


def _seqsum(a: np.ndarray) -> np.ndarray:
    """The C's `float s = 0; for (...) s += a[i];` down axis 0 (`+ 0`: 0 + -0 is +0)."""
    total: np.ndarray = np.add.reduce(a, axis=0) + F32(0)
    return total


# ---- make_qkx2_quants: the q4_K/q5_K (scale, min) search --------------------------------


def _qkx2(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """make_qkx2_quants down each column of x [32, B] with q4_K/q5_K's weights:
    -> scale [B], the_min [B] (>= 0, subtracted), L [32, B] float32 in 0..nmax.
    Tries nstep+1 scales (rmin + 0.1*step + nmax)/(max - min), keeping the least
    weighted error; as in the C, a better fit's min moves the grid of later tries."""
    w = np.sqrt(_seqsum(x * x) / F32(32)) + np.abs(x)  # av_x + |x|
    sums = _seqsum(w), _seqsum(w * x)
    top, bottom = x.max(axis=0), x.min(axis=0)
    lo = np.minimum(bottom, F32(0))  # the C clamps min > 0 to 0
    flat = top == lo  # the C returns at once: an infinite width keeps them inert
    inert = np.where(flat, F32(np.inf), F32(0))
    iscale = F32(nmax) / (top - lo + inert)
    scale = F32(1) / iscale
    best = _error(x, w, _levels(x, lo, iscale, (top, bottom), nmax), scale, lo)
    grid = lo, iscale  # the try whose levels won, recomputed once at the end
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(0.1) * F32(step) + F32(nmax)) / (top - lo + inert)
        lv = _levels(x, lo, iscale, (top, bottom), nmax)
        this_scale, this_lo, det = _fit(x, w, lv, sums)
        cur = _error(x, w, lv, this_scale, this_lo)
        better = (det > 0) & (cur < best)
        grid = np.where(better, lo, grid[0]), np.where(better, iscale, grid[1])
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_lo, lo)
    L = _levels(x, *grid, (top, bottom), nmax)
    L[:, flat] = 0
    return np.where(flat, F32(0), scale), -lo, L


def _levels(
    x: np.ndarray, lo: np.ndarray, iscale: np.ndarray, span: tuple[np.ndarray, ...], nmax: int
) -> np.ndarray:
    """MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) as float32. The float path is
    exact while |iscale*(x - min)| < 2**22; a chunk where that may fail (a min fitted
    up against max, a span < 1e-37, inf/nan) takes the C's bit trick itself."""
    v = x - lo
    v *= iscale
    reach = np.abs(iscale) * np.maximum(np.abs(span[0] - lo), np.abs(span[1] - lo))
    if (reach < 2**21).all():
        return _rint_clip(v, 0, nmax)
    exact: np.ndarray = np.clip(_nearest_int(v), 0, nmax).astype(F32)
    return exact


def _fit(
    x: np.ndarray, w: np.ndarray, L: np.ndarray, sums: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares x ~ scale*L + min -> (scale, min, determinant); a
    positive min is clamped to 0 and the scale refit through 0."""
    sum_w, sum_x = sums
    wl = w * L
    sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * L), _seqsum(wl * x)
    det = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
    this_lo = (sum_l2 * sum_x - sum_l * sum_xl) / det
    pos = this_lo > 0
    this_lo = np.where(pos, F32(0), this_lo)
    this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
    return this_scale, this_lo, det


def _error(
    x: np.ndarray, w: np.ndarray, L: np.ndarray, scale: np.ndarray, lo: np.ndarray
) -> np.ndarray:
    """sum of w * (scale*L + min - x)^2, rounded step by step as the C does."""
    diff = L * scale
    diff += lo
    diff -= x
    diff *= diff
    diff *= w
    return _seqsum(diff)


# ---- q4_K / q5_K --------------------------------------------------------------------------


def _kquant_mins(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Super-blocks x [b, 256] -> (d, dmin as fp16 bytes [b, 4], 6-bit scales and mins
    [b, 12], L [b, 256] uint8): what quantize_row_q4_K_ref and q5_K_ref share."""
    b = x.shape[0]
    cols = np.ascontiguousarray(x.reshape(b * 8, 32).T)
    scale, the_min, L = _qkx2(cols, nmax, rmin, nstep)
    scale, the_min = scale.reshape(b, 8), the_min.reshape(b, 8)
    max_scale = np.fmax(np.fmax.reduce(scale, axis=1), F32(0))  # C: `if (s > max)`
    max_min = np.fmax(np.fmax.reduce(the_min, axis=1), F32(0))
    ls, lm = _six_bits(scale, max_scale), _six_bits(the_min, max_min)
    d16, dmin16 = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
    d = (d16.astype(F32)[:, None] * ls.astype(F32)).reshape(b * 8)
    dm = (dmin16.astype(F32)[:, None] * lm.astype(F32)).reshape(b * 8)
    # the levels again, against the rounded scales; `if (!d) continue;` keeps the search's
    again = np.clip(_nearest_int((cols + dm) / d), 0, nmax).astype(F32)
    L = np.where(d != 0, again, L)
    packed = [
        ls[:, :4] | (ls[:, 4:] >> 4) << 6,  # scales 0-3, top bits of scales 4-7
        lm[:, :4] | (lm[:, 4:] >> 4) << 6,  # mins 0-3, top bits of mins 4-7
        (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4,  # low bits of scales and mins 4-7
    ]
    dd = np.stack([d16, dmin16], axis=1).view(np.uint8)
    return dd, np.concatenate(packed, axis=1), L.T.reshape(b, 256).astype(np.uint8)


def _six_bits(values: np.ndarray, top: np.ndarray) -> np.ndarray:
    """MIN(63, (uint8_t)nearest_int(63/top * v)): each sub-block's scale (or min) on a
    6-bit scale relative to the super-block's largest."""
    inv = np.where(top > 0, F32(63) / top, F32(0))[:, None]
    six: np.ndarray = np.minimum(_nearest_int(inv * values) & 0xFF, 63).astype(np.uint8)
    return six


def _q4_k(x: np.ndarray) -> np.ndarray:
    """block_q4_K: d, dmin, scales[12], qs[128] (of each 64 values, value j in the low
    nibble of byte j, value j + 32 in its high nibble)."""
    dd, scales, L = _kquant_mins(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)
    return np.concatenate([dd, scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    """block_q5_K: d, dmin, scales[12], qh[32] (bit k of byte j: the fifth bit of value
    32k + j), qs[128] (the low nibbles, laid out as q4_K's)."""
    dd, scales, L = _kquant_mins(x, 31, -0.5, 15)
    q = L.reshape(-1, 8, 32)
    qh = np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    low = (q & 0xF).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | low[:, :, 1] << 4).reshape(-1, 128)
    return np.concatenate([dd, scales, qh.astype(np.uint8), qs], axis=1)


# ---- q6_K ----------------------------------------------------------------------------------


def _qx(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, 32, x, L, rmse_type=1) down each column of x [16, B]: a signed
    scale [B] and L [16, B] float32 in 0..63 (all 0 for an all-zero group). Weights
    x^2; tries 18 scales around -32/max (max: the first value of largest |x|), so
    |iscale*x| <= 33 and np.rint is nearest_int."""
    first = np.abs(x).argmax(axis=0)[None]  # the C's strict `>` keeps the first
    top = np.take_along_axis(x, first, axis=0)[0]
    zero = np.abs(top) < _GROUP_MAX_EPS
    top = np.where(zero, F32(1), top)  # no inf/nan work for groups overwritten below
    w = x * x
    wx = w * x
    best_iscale = F32(-32) / top
    lv = _rint_clip(x * best_iscale, -32, 31)
    sumlx, suml2 = _seqsum(wx * lv), _seqsum(w * lv * lv)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(F32(32) + F32(0.1) * F32(step)) / top
        lv = _rint_clip(x * iscale, -32, 31)
        sumlx, suml2 = _seqsum(wx * lv), _seqsum(w * lv * lv)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    L = _rint_clip(x * best_iscale, -32, 31)  # the winning try's levels
    L += 32
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L


def _q6_k(x: np.ndarray) -> np.ndarray:
    """block_q6_K: ql[128], qh[64], int8 scales[16], d. Of each 128 values, the low
    nibbles of j and j + 64 share ql byte j, of j + 32 and j + 96 byte j + 32; qh byte j
    holds the top 2 bits of j, j + 32, j + 64 and j + 96."""
    b = x.shape[0]
    cols = np.ascontiguousarray(x.reshape(b * 16, 16).T)
    scale, L = _qx(cols)
    scale = scale.reshape(b, 16)
    size = np.where(np.isnan(scale), F32(0), np.abs(scale))  # the C's `>` skips nan
    first = size.argmax(axis=1)[:, None]  # the first of largest |scale|
    top = np.take_along_axis(scale, first, axis=1)[:, 0]
    empty = np.take_along_axis(size, first, axis=1)[:, 0] < _GROUP_MAX_EPS
    iscale = F32(-128) / top
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scale), 127).astype(np.int8)
    d = (d16.astype(F32)[:, None] * sc.astype(F32)).reshape(b * 16)
    again = np.clip(_nearest_int(cols / d), -32, 31).astype(F32) + F32(32)
    L = np.where(d != 0, again, L).T.reshape(b, 2, 4, 32).astype(np.uint8)
    ql = ((L[:, :, :2] & 0xF) | (L[:, :, 2:] & 0xF) << 4).reshape(b, 128)
    shifts = np.array([0, 2, 4, 6], np.uint8)[:, None]
    qh = np.bitwise_or.reduce((L >> 4) << shifts, axis=2).reshape(b, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16[:, None].view(np.uint8)], axis=1)
    out[empty] = 0  # the C zeroes the whole block
    return out


_KQUANTS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}
