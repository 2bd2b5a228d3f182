"""How output tensors are split into shard files, and what the files are called.

A pure function over sizes (as huggingface_hub's splitter is): the planner uses it for
the merge's output, lazymerge.testing for the checkpoints it builds, so both name and
split shards alike.
"""

from __future__ import annotations

from collections.abc import Sequence


def split(sizes: Sequence[int], shard_size: int) -> list[range]:
    """Consecutive groups of item indices, greedily, each at most `shard_size` bytes;
    an item larger than a shard gets a shard of its own (Hugging Face's rule)."""
    groups: list[range] = []
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and size + n > shard_size:
            groups.append(range(start, i))
            start, size = i, 0
        size += n
    groups.append(range(start, len(sizes)))
    return groups


def shard_name(k: int, n: int, stem: str = "model", suffix: str = "safetensors") -> str:
    """The k-th (0-based) of n shard files: model-00001-of-00003.safetensors."""
    return f"{stem}-{k + 1:05d}-of-{n:05d}.{suffix}"


def largest_oversized(sizes: Sequence[int], shard_size: int) -> int | None:
    """The largest item when it is larger than `shard_size` (split gives such items a
    shard of their own, whatever the size asked); None when every item fits a shard."""
    largest = max(sizes, default=0)
    return largest if largest > shard_size else None
