"""Fuzzing the two parsers that read strangers' files.

Property: any input either parses into tensors whose bytes lie inside the file, or raises
InputError — never another exception, never a hang (deadline), never a huge allocation.
CI runs a short pass; for a long one: LAZYMERGE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lazymerge.errors import InputError
from lazymerge.read.safetensors import read_header
from lazymerge.read.tensorref import TensorRef
from lazymerge.read.torchzip import read_bin

FUZZ = settings(
    max_examples=int(os.environ.get("LAZYMERGE_FUZZ_EXAMPLES", "150")),
    deadline=2000,  # ms per example: a hang fails the test
    suppress_health_check=[HealthCheck.too_slow],
)


def parse(reader: object, data: bytes, suffix: str) -> dict[str, TensorRef] | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"model{suffix}"
        path.write_bytes(data)
        try:
            refs = reader(path)  # type: ignore[operator]
        except InputError:
            return None
        for ref in refs.values():
            reach = ref.span if ref.span is not None else ref.nbytes
            assert ref.offset >= 0 and ref.offset + reach <= len(data), ref
        return refs  # type: ignore[no-any-return]


@FUZZ
@given(st.binary(max_size=512))
def test_safetensors_random_bytes(data: bytes) -> None:
    parse(read_header, data, ".safetensors")


entries = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "Q4", 7, None]),
            "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.just("x")),
            "data_offsets": st.one_of(
                st.lists(st.integers(-10, 300), min_size=0, max_size=3), st.none()
            ),
        }
    ),
    max_size=5,
)


@FUZZ
@given(entries, st.binary(max_size=300), st.integers(0, 2**64 - 1) | st.none())
def test_safetensors_structured_headers(
    header: dict[str, object], data: bytes, length: int | None
) -> None:
    body = json.dumps(header).encode()
    n = len(body) if length is None else length
    parse(read_header, struct.pack("<Q", n) + body + data, ".safetensors")


def _valid_bin() -> bytes:
    buf = io.BytesIO()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"a": base[:2], "b": base[2:].t(), "c": torch.ones(3).half()}, buf)
    return buf.getvalue()


VALID_BIN = _valid_bin()


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_BIN) - 1), st.integers(0, 255)), max_size=8),
    st.integers(1, len(VALID_BIN)),
)
@example(flips=[(1931, 2)], keep=1957)  # once crashed zipfile.is_zipfile (BadZipFile)
def test_bin_mutated_archive(flips: list[tuple[int, int]], keep: int) -> None:
    data = bytearray(VALID_BIN[:keep])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    parse(read_bin, bytes(data), ".bin")


def _with_pickle(pkl: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(VALID_BIN)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename, data)
    return out.getvalue()


with zipfile.ZipFile(io.BytesIO(VALID_BIN)) as _z:
    VALID_PKL = _z.read(next(n for n in _z.namelist() if n.endswith("/data.pkl")))


@FUZZ
@given(
    st.binary(max_size=256)
    | st.lists(st.tuples(st.integers(0, len(VALID_PKL) - 1), st.integers(0, 255)), max_size=6)
)
def test_bin_fuzzed_pickle(pkl: bytes | list[tuple[int, int]]) -> None:
    if isinstance(pkl, list):  # mutate a real data.pkl: reaches the unpickler's deep paths
        data = bytearray(VALID_PKL)
        for pos, value in pkl:
            data[pos] = value
        pkl = bytes(data)
    parse(read_bin, _with_pickle(pkl), ".bin")


def test_valid_inputs_still_parse() -> None:
    """The fuzzers' seeds are good files: the property is not met by refusing everything."""
    refs = parse(read_bin, VALID_BIN, ".bin")
    assert refs is not None and set(refs) == {"a", "b", "c"}
    assert parse(read_bin, _with_pickle(VALID_PKL), ".bin") is not None


def test_forged_memo_index_is_refused_before_allocating() -> None:
    # LONG_BINPUT 0xFFFFFFF0: the C unpickler would size its memo for four billion entries.
    pkl = b"\x80\x02}r\xf0\xff\xff\xff."
    assert parse(read_bin, _with_pickle(pkl), ".bin") is None
