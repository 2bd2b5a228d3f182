"""Vocabularies aligned by token, as mergekit aligns them (its tokenizer/build.py and
tokenizer/embed.py): the output's vocabulary, and for every model which of its rows each
output token takes — or, where a model lacks the token (or `force` says so), the default
row every model then takes:

  a `tokens:` rule's source      that model's row for the token (or for another token),
                                 or zeros;
  present in exactly one model   that model's row;
  present in the base            the base's row;
  otherwise                      the average of the rows of the models that have it,
                                 summed in order and divided in the compute dtype.

The union keeps the base's tokenizer and appends every other token: the models in the
recipe's order, each model's plain tokens in id order, then the added tokens (each with
the settings of the first model that adds it). mergekit appends them in the order of a
hash map, which changes from run to run; here the order is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ABSENT = -1  # the token's default row
MEAN = -2  # a padding row (pad_to_multiple_of): the mean of the model's aligned rows
Part = tuple[int, int]  # (model index, row): one row a default is made of


@dataclass(frozen=True)
class RowRule:
    """A `tokens:` rule resolved: the default's parts ((): zeros; None: no source given)
    and whether every model takes it."""

    parts: tuple[Part, ...] | None
    force: bool = False


@dataclass(frozen=True)
class Alignment:
    """Per model, the row each output token takes (ABSENT: the default), and the default
    rows by output row. `rows` is the output's vocabulary size."""

    rows: int
    own: tuple[np.ndarray, ...]
    defaults: Mapping[int, tuple[Part, ...]]


def union_tokens(
    models: Sequence[Mapping[str, int]], added: Sequence[Sequence[dict[str, Any]]]
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """What a union appends to the base's tokenizer: the plain tokens in order, and the
    added tokens by content (the first model's settings). `models[i]` holds the tokens
    model i has rows for, `added[i]` its tokenizer.json added-token entries."""
    added_tokens: dict[str, dict[str, Any]] = {}
    for ids, entries in zip(models, added, strict=True):
        for entry in sorted(entries, key=lambda e: int(e["id"])):
            if entry["content"] in ids and entry["content"] not in added_tokens:
                added_tokens[entry["content"]] = entry
    plain: dict[str, None] = {}  # (a dict: ordered, each once)
    for ids in models:
        for token in sorted(ids, key=ids.__getitem__):
            if token not in added_tokens:
                plain.setdefault(token)
    return list(plain), added_tokens


def permutation(out: Mapping[str, int], ids: Mapping[str, int]) -> np.ndarray:
    """For every output token (by id), the model's row for it, or ABSENT."""
    rows = np.full(len(out), ABSENT, dtype=np.int64)
    for token, i in out.items():
        rows[i] = ids.get(token, ABSENT)
    return rows


def align(
    out: Mapping[str, int],
    perms: Sequence[np.ndarray],
    base: int | None,
    rules: Mapping[str, RowRule],
) -> Alignment:
    """Which row every model takes for every output token, and the defaults: for the
    tokens some model lacks, and those a rule forces."""
    forced = np.zeros(len(out), dtype=bool)
    forced[[out[t] for t, rule in rules.items() if rule.force and t in out]] = True
    need = forced | ~(np.stack(perms) >= 0).all(axis=0)
    names = dict.fromkeys(np.flatnonzero(need).tolist(), "")
    for token, i in out.items():
        if i in names:
            names[i] = token
    defaults = {
        i: _default(token, [int(p[i]) for p in perms], base, rules.get(token))
        for i, token in names.items()
    }
    own = tuple(np.where(forced, ABSENT, p) for p in perms)
    return Alignment(len(out), own, defaults)


def _default(
    token: str, rows: Sequence[int], base: int | None, rule: RowRule | None
) -> tuple[Part, ...]:
    """The default row of one token: `rows` holds each model's row for it (or ABSENT)."""
    if rule is not None:
        if rule.parts is None:
            raise ValueError(f"token {token!r}: a model lacks it and its rule names no source")
        return rule.parts
    holders = [m for m, row in enumerate(rows) if row != ABSENT]
    if len(holders) == 1 or (base is not None and rows[base] != ABSENT):
        who = holders[0] if len(holders) == 1 else base
        assert who is not None
        return ((who, rows[who]),)
    return tuple((m, rows[m]) for m in holders)  # (): in no model, zeros


SETTINGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def conflicts(added: Sequence[Sequence[dict[str, Any]]]) -> list[tuple[str, int]]:
    """Added tokens a later model adds with other settings than the first model that adds
    it (mergekit keeps the first's, with a warning): (token, that model's index)."""
    first: dict[str, tuple[Any, ...]] = {}
    found = []
    for k, entries in enumerate(added):
        for entry in entries:
            settings = tuple(entry.get(key) for key in SETTINGS)
            if first.setdefault(entry["content"], settings) != settings:
                found.append((entry["content"], k))
    return found
