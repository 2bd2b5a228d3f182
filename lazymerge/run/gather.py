"""A vocabulary tensor's rows read by token (plan/vocab.py's RowMap): each output row the
model's own row for that token, gathered from the map, or the default every model takes
for it — other inputs' rows summed in order and divided by their count in the compute
dtype, as mergekit's PermutedVocabulary makes them (zeros for none)."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from lazymerge.meaning.vocab import MEAN
from lazymerge.plan.model import Input, RowMap
from lazymerge.read.mapped import DTYPES, MappedReader
from lazymerge.run.device import Scratch

GATHER_ROWS = 256  # rows gathered at once: their copies (input dtype, then fp32) stay small
_HOST = Scratch()  # the padding mean is summed on the CPU, whatever the merge's device
_MEANS: weakref.WeakKeyDictionary[RowMap, torch.Tensor] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def gather_rows(
    reader: MappedReader, scratch: Scratch, acc: torch.Tensor, inp: Input, r0: int
) -> None:
    """acc <- output rows [r0, r0 + len(acc)) of `inp`, read through its row map,
    GATHER_ROWS at a time (the gathered copies stay that small)."""
    for q in range(0, acc.shape[0], GATHER_ROWS):
        _piece(reader, scratch, acc[q : q + GATHER_ROWS], inp, r0 + q)


def _piece(reader: MappedReader, scratch: Scratch, acc: torch.Tensor, inp: Input, r0: int) -> None:
    """Up to GATHER_ROWS output rows; then the pages of every tensor read go: single rows
    read here and there fault their neighbours in too (the kernel's fault-around), which
    would pile up if only the rows read were released."""
    ref, m = inp.ref, inp.gather
    assert m is not None
    own = torch.from_numpy(m.own[r0 : r0 + acc.shape[0]])
    have = own >= 0
    if bool(have.any()):
        idx = own[have]
        lo = int(idx.min())
        rows = reader.rows(ref, lo, int(idx.max()) + 1)[idx - lo]  # only these rows' pages
        acc[have.to(acc.device)] = scratch.put(rows, acc.dtype)
    for i in torch.nonzero(~have).flatten().tolist():
        row = _mean(reader, inp) if own[i] == MEAN else _default(reader, m, r0 + i)
        acc[i] = scratch.put(row, acc.dtype)
    for read in (ref, *m.sources):
        reader.release(read)


def _mean(reader: MappedReader, inp: Input) -> torch.Tensor:
    """A padding row: the mean of the input's aligned rows, each as the compute dtype
    holds it (mergekit's torch.mean over them), summed in float64 and rounded once.
    Computed once per input (lanes may race to it: the same value either way)."""
    m = inp.gather
    assert m is not None
    with _LOCK:
        if m in _MEANS:
            return _MEANS[m]
    tokens = int(np.argmax(m.own == MEAN))  # the padding rows come last
    dtype = DTYPES[m.dtype]
    total = torch.zeros(inp.ref.shape[1:], dtype=torch.float64)
    rows = torch.empty((GATHER_ROWS, *inp.ref.shape[1:]), dtype=torch.float32)
    for q in range(0, tokens, GATHER_ROWS):
        piece = rows[: min(GATHER_ROWS, tokens - q)]
        _piece(reader, _HOST, piece, inp, q)
        total += piece.to(dtype).to(torch.float64).sum(dim=0)
    mean = (total / tokens).to(dtype)
    with _LOCK:
        _MEANS[m] = mean
    return mean


def _default(reader: MappedReader, m: RowMap, row: int) -> torch.Tensor:
    """The default row: its parts summed in order in the compute dtype, then divided."""
    parts = m.defaults[row]
    dtype = DTYPES[m.dtype]
    if not parts:
        return torch.zeros(1, dtype=dtype)  # broadcast over the row
    total: torch.Tensor | None = None
    for ref, r in parts:  # (their pages go with the piece's: _piece)
        value = reader.rows(ref, r, r + 1)[0].to(dtype, copy=True)
        total = value if total is None else total + value
    assert total is not None
    return total if len(parts) == 1 else total / len(parts)
