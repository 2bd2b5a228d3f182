"""Exact order statistics over a stream of blocks, and masks of rank ranges, against a
longhand: a stable sort by (value, flat index) of the whole tensor."""

from __future__ import annotations

import random

import pytest
import torch

from lazymerge.errors import NumericsError
from lazymerge.meaning.methods.select import Cut, OrderStats, RankMask, range_ranks

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
KINDS = ["spread", "few", "tiny", "wide", "equal", "zeros"]


PATTERN = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def tiniest(dtype: torch.dtype) -> float:
    """The smallest positive subnormal: bit pattern 1."""
    return float(torch.tensor([1], dtype=PATTERN[dtype]).view(dtype))


def sample(kind: str, dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """Non-negative values of one kind, with the ties, signed zeros, subnormals and infs
    a magnitude can have."""
    if kind == "spread":  # |randn|: few ties in float32, many in 16 bits
        return torch.randn(n, generator=gen).abs().to(dtype)
    if kind == "few":  # a handful of distinct values, each tied many times
        pool = torch.tensor([0.0, -0.0, tiniest(dtype), 1.0, 2.5, 1e-3, float("inf")])
        return pool[torch.randint(len(pool), (n,), generator=gen)].to(dtype)
    if kind == "tiny":  # subnormals only, with zeros of both signs
        k = torch.randint(-3, 40, (n,), generator=gen).clamp(min=0).float()
        signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        return (k * tiniest(dtype)).to(dtype) * torch.where(k == 0, signs, 1.0).to(dtype)
    if kind == "wide":  # exponents across the range, inf included
        x = torch.exp2(torch.rand(n, generator=gen) * 60 - 30)
        x[torch.randint(n, (3,), generator=gen)] = float("inf")
        return x.to(dtype)
    if kind == "equal":
        return torch.full((n,), 0.375, dtype=dtype)
    return torch.zeros(n, dtype=dtype)


def order(values: torch.Tensor) -> torch.Tensor:
    """Flat indices in ascending rank: by value (-0.0 as 0.0), ties by index."""
    return torch.sort(values.reshape(-1).float() + 0.0, stable=True).indices


def cut_longhand(values: torch.Tensor, rank: int) -> Cut:
    flat = values.reshape(-1).float() + 0.0
    v = float(flat[order(values)[rank]])
    return Cut(rank, v, int((flat < v).sum()), int((flat == v).sum()))


def mask_longhand(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order(values)[max(lo, 0) : max(hi, 0)]] = True
    return keep.view(values.shape)


def splits(n: int, size: int | None, rng: random.Random) -> list[int]:
    """Block sizes summing to n: all `size`, or random ones (zero-sized blocks included)."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(size if size is not None else rng.choice([0, 1, 2, 50, 333, 1000]))
    sizes[-1] -= sum(sizes) - n
    return sizes


def stream(
    values: torch.Tensor, sizes: list[int], ranks: tuple[int, ...], lo: int, hi: int
) -> tuple[tuple[Cut, ...], torch.Tensor]:
    """The cuts at `ranks` and the mask of ranks [lo, hi), with the flat values streamed
    in blocks of `sizes`, once per pass, then once for the mask."""
    blocks = values.reshape(-1).split(sizes)
    stats = OrderStats(values.dtype, ranks)
    for _ in range(stats.passes):
        for block in blocks:
            stats.update(block)
        stats.next_pass()
    mask = stats.mask(lo, hi)
    return stats.cuts(), torch.cat([mask(block) for block in blocks]).view(values.shape)


def test_a_tiny_example_by_hand() -> None:
    # ascending, ties by index: 0 (at 2), -0.0 (4), 1 (1), 1 (3), 1 (6), 3 (0), 5 (5), inf (7)
    for dtype in DTYPES:
        x = torch.tensor([3.0, 1.0, 0.0, 1.0, -0.0, 5.0, 1.0, float("inf")], dtype=dtype)
        cuts, mask = stream(x, [2, 3, 3], (3, 0, 7, 5), 3, 7)
        assert cuts == (
            Cut(rank=3, value=1.0, below=2, equal=3),
            Cut(rank=0, value=0.0, below=0, equal=2),
            Cut(rank=7, value=float("inf"), below=7, equal=1),
            Cut(rank=5, value=3.0, below=5, equal=1),
        )
        # ranks 3..6: the second and third 1 (at 3 and 6), then 3 (at 0) and 5 (at 5)
        assert mask.tolist() == [True, False, False, True, False, True, True, False]
        _, mask = stream(x, [8], (1, 4), 1, 4)  # ranks 1..3: -0.0 (4), 1 (1), 1 (3)
        assert mask.tolist() == [False, True, False, True, True, False, False, False]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuts_and_masks_match_a_stable_sort(dtype: torch.dtype, kind: str) -> None:
    seed = DTYPES.index(dtype) * 100 + KINDS.index(kind)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    n = 3000
    x = sample(kind, dtype, n, gen).view(60, 50)
    for _ in range(4):
        lo, hi = sorted(rng.sample(range(n + 1), 2))
        ranks = (0, n - 1, rng.randrange(n), *range_ranks(lo, hi, n))
        cuts, mask = stream(x, splits(n, None, rng), ranks, lo, hi)
        assert cuts == tuple(cut_longhand(x, r) for r in ranks)
        assert torch.equal(mask, mask_longhand(x, lo, hi))
        assert int(mask.sum()) == hi - lo


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_sizes_change_nothing(dtype: torch.dtype) -> None:
    gen, rng = torch.Generator().manual_seed(7), random.Random(7)
    n = 700
    x = sample("few", dtype, n, gen)
    lo, hi = 130, 555
    ranks = range_ranks(lo, hi, n)
    want = stream(x, [n], ranks, lo, hi)
    for size in (1, 7, None):
        got = stream(x, splits(n, size, rng), ranks, lo, hi)
        assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_blocks_of_rows_give_masks_of_their_shape() -> None:
    """What the methods stream: blocks of rows of a 2-D tensor, the mask in their shape."""
    gen = torch.Generator().manual_seed(9)
    x = sample("spread", torch.float16, 28 * 25, gen).view(28, 25)
    lo, hi = 100, 600
    rows = x.split([5, 1, 13, 9])
    stats = OrderStats(torch.float16, range_ranks(lo, hi, x.numel()))
    for block in rows:
        stats.update(block)
    stats.next_pass()
    mask = stats.mask(lo, hi)
    parts = [mask(block) for block in rows]
    assert [m.shape for m in parts] == [b.shape for b in rows]
    assert torch.equal(torch.cat(parts), mask_longhand(x, lo, hi))
    again = stats.mask(lo, hi)  # a fresh mask for another pass over the blocks
    assert torch.equal(torch.cat([again(block) for block in rows]), torch.cat(parts))


def test_the_mask_keeps_by_value_then_by_index() -> None:
    """Everything strictly between the bounds' values is kept; at each bound the tie class
    is cut at the right count, lowest indices first among the ranks above the low cut."""
    gen = torch.Generator().manual_seed(3)
    x = sample("few", torch.bfloat16, 5000, gen)
    lo, hi = 1234, 4321
    (low, high), mask = stream(x, [999] * 5 + [5], (lo, hi), lo, hi)
    assert low.value < high.value  # two tie classes, one cut in each
    inside = (x > low.value) & (x < high.value)
    assert bool(mask[inside].all()) and not bool(mask[(x < low.value) | (x > high.value)].any())
    at_low = (x == low.value).nonzero().view(-1)
    kept_low = mask[at_low]  # ties of the low cut: a run of dropped, then a run of kept
    assert int(kept_low.sum()) == low.below + low.equal - lo
    assert torch.equal(kept_low, torch.arange(len(at_low)) >= lo - low.below)
    at_high = (x == high.value).nonzero().view(-1)
    assert torch.equal(mask[at_high], torch.arange(len(at_high)) < hi - high.below)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edges_of_the_range(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    x = sample("few", dtype, 400, gen).view(20, 20)
    n = x.numel()
    for lo, hi in [(n - 1, n), (0, 1), (0, n), (n, n), (0, 0), (7, 7), (9, 3), (-5, n + 5)]:
        ranks = range_ranks(lo, hi, n)
        _, mask = stream(x, [150, 250], ranks, lo, hi)
        assert torch.equal(mask, mask_longhand(x, lo, min(hi, n))), (lo, hi)
        assert int(mask.sum()) == max(0, min(hi, n) - max(lo, 0))
    assert range_ranks(0, n, n) == () and range_ranks(5, 5, n) == ()
    assert range_ranks(3, n, n) == (3,) and range_ranks(0, 9, n) == (9,)
    assert range_ranks(3, 9, n) == (3, 9) and range_ranks(-2, n + 2, n) == ()


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_bounds_in_one_tie_class(dtype: torch.dtype) -> None:
    """All values equal: ranks are flat indices, so [lo, hi) keeps exactly those indices."""
    x = torch.full((10, 10), 2.0, dtype=dtype)
    (low, high), mask = stream(x, [33, 33, 34], (40, 75), 40, 75)
    assert low == Cut(40, 2.0, 0, 100) and high == Cut(75, 2.0, 0, 100)
    assert mask.reshape(-1).nonzero().view(-1).tolist() == list(range(40, 75))


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_empty_tensor(dtype: torch.dtype) -> None:
    stats = OrderStats(dtype)
    for _ in range(stats.passes):
        stats.update(torch.empty(0, 5, dtype=dtype))
        stats.next_pass()
    assert stats.count == 0 and stats.cuts() == ()
    assert stats.mask(0, 0)(torch.empty(0, 5, dtype=dtype)).shape == (0, 5)


def test_ranks_can_wait_for_the_first_pass() -> None:
    """SCE: keep the k largest variances, k a share of the nonzero ones, counted in the
    first pass; float32's second pass needs the ranks."""
    gen = torch.Generator().manual_seed(5)
    v = torch.rand(2000, generator=gen) * (torch.rand(2000, generator=gen) < 0.6)
    blocks = v.split(300)
    stats = OrderStats(torch.float32)
    nonzero = 0
    for block in blocks:
        stats.update(block)
        nonzero += int(block.count_nonzero())
    n, k = stats.count, int(nonzero * 0.3)
    stats.next_pass(range_ranks(n - k, n, n))
    for block in blocks:
        stats.update(block)
    stats.next_pass()
    mask = stats.mask(n - k, n)
    kept = torch.cat([mask(b) for b in blocks])
    assert torch.equal(kept.nonzero().view(-1).sort().values, v.topk(k).indices.sort().values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_refuses_negative_values_and_nan(dtype: torch.dtype) -> None:
    for bad in (-2.0, -float("inf"), -tiniest(dtype)):
        with pytest.raises(ValueError, match="negative values"):
            OrderStats(dtype).update(torch.tensor([1.0, bad], dtype=dtype))
    # a NaN with its sign bit set: a negative value, or (bfloat16's + 0.0 drops the sign) a NaN
    stats = OrderStats(dtype, (0,))
    with pytest.raises((ValueError, NumericsError), match=r"negative values|NaN among"):
        stats.update(torch.tensor([-1], dtype=PATTERN[dtype]).view(dtype))  # all bits set
        stats.next_pass()
    stats = OrderStats(dtype, (1,))
    stats.update(torch.tensor([1.0, float("inf")], dtype=dtype))
    stats.update(torch.tensor([float("nan")], dtype=dtype))
    with pytest.raises(NumericsError, match="NaN among the values"):
        stats.next_pass()


def test_a_float32_nan_with_its_payload_in_the_low_half() -> None:
    """A signalling NaN's high half can be inf's; reading `values + 0.0` quiets it, so
    the first pass sees it anyway."""
    nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    stats = OrderStats(torch.float32, (0,))
    stats.update(torch.cat([torch.tensor([1.0, float("inf")]), nan]))
    with pytest.raises(NumericsError, match="NaN among the values"):
        stats.next_pass()


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="not float16, bfloat16 or float32"):
        OrderStats(torch.float64)
    stats = OrderStats(torch.float32, (0,))
    with pytest.raises(ValueError, match=r"a torch\.float16 block in a torch\.float32 stream"):
        stats.update(torch.zeros(3, dtype=torch.float16))
    stats.update(torch.ones(3))
    with pytest.raises(ValueError, match="0 of 2 passes complete"):
        stats.cuts()
    with pytest.raises(ValueError, match=r"rank\(s\) \[5\] outside 0 .. 2"):
        stats.next_pass((0, 5))
    stats = OrderStats(torch.float32, (0,))
    stats.update(torch.ones(3))
    stats.next_pass()
    with pytest.raises(ValueError, match="fixed at the end of the first pass"):
        stats.next_pass((1,))
    stats.update(torch.ones(2))
    with pytest.raises(ValueError, match="pass 2 saw 2 elements, the first 3"):
        stats.next_pass()
    stats = OrderStats(torch.bfloat16, (0,))
    stats.update(torch.ones(3, dtype=torch.bfloat16))
    stats.next_pass()
    with pytest.raises(ValueError, match="all 1 passes are complete"):
        stats.update(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"rank\(s\) \[2\] were not asked for"):
        stats.mask(0, 2)


def test_rank_mask_from_cuts() -> None:
    """The constructor takes cuts directly: None for an open end; crossed cuts keep none."""
    x = torch.tensor([4.0, 1.0, 3.0, 2.0])
    two, three = Cut(1, 2.0, 1, 1), Cut(2, 3.0, 2, 1)
    assert RankMask(two, None)(x).tolist() == [True, False, True, True]
    assert RankMask(None, three)(x).tolist() == [False, True, False, True]
    assert RankMask(None, None)(x).all() and not RankMask(three, two)(x).any()
    assert not RankMask.nothing()(x).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_same_cuts_and_masks_on_cuda(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(13)
    x = sample("few", dtype, 100_000, gen)
    lo, hi, sizes = 12_345, 87_654, [30_000, 30_000, 40_000]
    want = stream(x, sizes, range_ranks(lo, hi, x.numel()), lo, hi)
    got = stream(x.cuda(), sizes, range_ranks(lo, hi, x.numel()), lo, hi)
    assert got[0] == want[0] and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("wide", [torch.float32, torch.float64])
def test_weights_are_the_mask_as_one_and_positive_zero(wide: torch.dtype) -> None:
    """`RankMask.weights`, the form TIES and SCE multiply by: over float32 or float64
    blocks (16-bit magnitudes widened), exactly 1.0 where the longhand keeps and +0.0
    elsewhere (never -0.0, which would flip the sign of a product), for every kind of
    range and through the tie-counting path."""
    gen = torch.Generator().manual_seed(17)
    x = sample("few", torch.float16, 3000, gen)
    n = x.numel()
    for lo, hi in [(1000, n), (0, 2000), (700, 2300), (0, n), (5, 5)]:
        ranks = range_ranks(lo, hi, n)
        stats = OrderStats(x.dtype, ranks)
        blocks = x.split([999, 1, 1000, 1000])
        for _ in range(stats.passes):
            for block in blocks:
                stats.update(block)
            stats.next_pass()
        mask = stats.mask(lo, hi)
        got = torch.cat([mask.weights(block.to(wide)) for block in blocks])
        assert got.dtype == wide
        expected = mask_longhand(x, lo, hi).to(wide)
        assert torch.equal(got, expected), (lo, hi)
        assert not bool(torch.signbit(got).any()), (lo, hi)
