"""Statistics shared among lanes (meaning.methods.base.Splittable): order statistics and
exact sums fed in parts, by any split of the blocks, merge to one stream's; a rank mask
given blocks from several threads at once, each with its flat start, keeps what it keeps
given them in order; a block that will not come lets the waiting ones go (abandon)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from lazymerge.meaning.methods.exact import Sum, f64
from lazymerge.meaning.methods.fusion import Quantiles, quartile_ranks
from lazymerge.meaning.methods.select import OrderStats, range_ranks

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def few_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Non-negative values with many ties (a few hundred distinct ones)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 300, (n,), generator=gen).to(dtype) / 64).to(dtype)


def blocks_of(values: torch.Tensor, seed: int) -> list[tuple[int, torch.Tensor]]:
    """(flat start, block) for random block sizes, in flat order."""
    rng = random.Random(seed)
    out, at = [], 0
    while at < values.numel():
        size = rng.choice([1, 7, 50, 333])
        out.append((at, values[at : at + size]))
        at += size
    return out


def inside_ties(values: torch.Tensor, rank: int) -> int:
    """The first rank from `rank` on whose value the rank below it shares."""
    ascending = values.sort().values
    return next(r for r in range(rank, len(values)) if ascending[r - 1] == ascending[r])


def in_parts(
    stats: OrderStats, blocks: list[tuple[int, torch.Tensor]], parts: int, rng: random.Random
) -> None:
    """One pass: every block fed into one of `parts` parts at random, merged back."""
    shares = [stats.part() for _ in range(parts)]
    for _, block in blocks:
        rng.choice(shares).update(block)
    for share in rng.sample(shares, parts):  # merged in any order
        stats.merge(share)
    stats.next_pass()


@pytest.mark.parametrize("dtype", DTYPES)
def test_order_statistics_fed_in_parts_are_one_streams(dtype: torch.dtype) -> None:
    values = few_values(dtype, 5000, 1)
    n, lo, hi = values.numel(), 1300, 4100
    blocks = blocks_of(values, 2)
    whole = OrderStats(dtype, range_ranks(lo, hi, n))
    for _ in range(whole.passes):
        for _, block in blocks:
            whole.update(block)
        whole.next_pass()
    rng = random.Random(3)
    for parts in (1, 2, 5):
        split = OrderStats(dtype, range_ranks(lo, hi, n))
        for _ in range(split.passes):
            in_parts(split, blocks, parts, rng)
        assert split.complete and split.count == n
        assert split.cuts() == whole.cuts()


def test_a_part_of_another_pass_is_refused() -> None:
    stats = OrderStats(torch.float32, (10,))
    part = stats.part()
    stats.update(torch.ones(20))
    stats.next_pass()
    with pytest.raises(ValueError, match="another pass"):
        stats.merge(part)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rank_mask_given_blocks_from_threads_keeps_what_it_keeps_in_order(
    dtype: torch.dtype,
) -> None:
    """Blocks handed out in flat order to three threads, which finish in any order (random
    sleeps), each counting the ties before it: the mask of one thread, the ties at both
    cuts split by flat index."""
    values = few_values(dtype, 4000, 4)
    n, lo, hi = values.numel(), inside_ties(values, 900), inside_ties(values, 3100)
    stats = OrderStats(dtype, range_ranks(lo, hi, n))
    blocks = blocks_of(values, 5)
    for _ in range(stats.passes):
        for _, block in blocks:
            stats.update(block)
        stats.next_pass()
    cuts = stats.cuts()
    assert all(c.rank > c.below for c in cuts)  # both cuts split a class of ties
    in_order = stats.mask(lo, hi)
    ordered = torch.cat([in_order(block) for _, block in blocks])
    mask = stats.mask(lo, hi)
    got: dict[int, torch.Tensor] = {}
    todo = list(blocks)
    lock = threading.Lock()

    def lane(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:  # taken in flat order, as Lanes hands them out
                if not todo:
                    return
                start, block = todo.pop(0)
            time.sleep(rng.random() / 2000)
            got[start] = mask(block, start)

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert torch.equal(torch.cat([got[start] for start, _ in blocks]), ordered)
    assert int(ordered.sum()) == hi - lo


def test_abandon_lets_a_waiting_block_go_and_a_block_counts_once() -> None:
    values = few_values(torch.float16, 1000, 6)
    stats = OrderStats(torch.float16, range_ranks(500, 1000, 1000))
    stats.update(values)
    stats.next_pass()
    mask = stats.mask(500, 1000)
    assert stats.cuts()[0].rank > stats.cuts()[0].below
    mask(values[:100], 0)
    with pytest.raises(ValueError, match="the block at 0 again"):
        mask(values[:100], 0)
    done: list[torch.Tensor] = []
    waiting = threading.Thread(target=lambda: done.append(mask(values[200:300], 200)))
    waiting.start()  # waits for the block at 100, which never comes
    waiting.join(0.2)
    assert waiting.is_alive() and not done
    mask.abandon()
    waiting.join(60)
    assert not waiting.is_alive() and len(done) == 1


def test_exact_sums_and_quantiles_merge_from_any_split() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(300, 40, generator=gen) * torch.logspace(-6, 6, 40)
    whole = Sum()
    whole.add(x)
    parts = [Sum() for _ in range(3)]
    for k, rows in enumerate(x.split([1, 50, 7, 100, 142])):
        parts[k % 3].add(rows)
    merged = Sum()
    for part in reversed(parts):
        merged.merge(part)
    assert merged.total() == whole.total()

    importance = torch.randn(6000, generator=gen).abs() - 0.2  # some negative
    importance[::97] = float("nan")
    ranks = quartile_ranks(importance.numel())
    one, split = Quantiles(torch.float32, ranks), Quantiles(torch.float32, ranks)
    for _ in range(one.passes):
        shares = [split.part(), split.part()]
        for k, block in enumerate(importance.split(1000)):
            one.update(block)
            shares[k % 2].update(block)
        for share in shares:
            split.merge(share)
        one.next_pass()
        split.next_pass()
    assert [repr(v) for v in split.values()] == [repr(v) for v in one.values()]  # NaN too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_f64_is_torchs_double_bit_for_bit(dtype: torch.dtype) -> None:
    """exact.f64 (16-bit floats through float32) gives `.double()`'s bits for every
    16-bit pattern, NaNs and subnormals included, and for float32 specials."""
    if dtype == torch.float32:
        x = torch.tensor([0.0, -0.0, 1e-45, -3e38, float("inf"), float("nan"), 1.5])
    else:
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert torch.equal(f64(x).view(torch.int64), x.double().view(torch.int64))
