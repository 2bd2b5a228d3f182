"""Fuzzing the two parsers that read strangers' files.

Property: any input either parses into tensors whose bytes lie inside the file, or raises
InputError — never another exception, never a hang (deadline), never a huge allocation.
And what is read is what the reference reads: a safetensors file we accept is one
`safetensors.safe_open` reads, to the same tensors from the same bytes (we refuse more:
duplicate keys); a `.bin` we accept holds the tensors torch.save was given.
CI runs a short pass; for a long one: LAZYMERGE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_bin import DupState
from test_index import reference

from lazymerge.errors import InputError
from lazymerge.read.mapped import MappedReader
from lazymerge.read.safetensors import read_header
from lazymerge.read.tensorref import TensorRef, itemsize
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


Reading = dict[str, tuple[str, list[int], bytes]]


def safetensors_reads(path: Path) -> Reading | None:
    """safetensors' reading of a file: name -> (dtype, shape, bytes); None if it refuses."""
    try:
        read = reference(path)
    except Exception:  # not SafetensorError: anything else it raises on a strange file
        return None
    return None if isinstance(read, str) else read


def check_safetensors(data: bytes) -> bool:
    """Refused, or read as safetensors reads it; True when read."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(data)
        refs = parse(read_header, data, ".safetensors")
        if refs is None:
            return False
        ours = {
            r.name: (r.dtype, list(r.shape), data[r.offset : r.offset + r.nbytes])
            for r in refs.values()
        }
        assert ours == safetensors_reads(path)
        return True


@FUZZ
@given(st.binary(max_size=512))
def test_safetensors_random_bytes(data: bytes) -> None:
    check_safetensors(data)


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
    check_safetensors(struct.pack("<Q", n) + body + data)


DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E5M2"]
# A name again, as it stands in the JSON: "\u0074\u0030" is "t0" too.
TWICE = ['"t0"', '"\\u0074\\u0030"']


@st.composite
def entry_text(draw: st.DrawFn, start: int) -> tuple[str, int]:
    """One tensor's entry as JSON text (a field may come twice) and where its data ends."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    end = start + math.prod(shape) * itemsize(dtype)
    fields = [("dtype", f'"{dtype}"'), ("shape", json.dumps(shape))]
    fields.append(("data_offsets", json.dumps([start, end])))
    if draw(st.integers(0, 9)) == 4:  # a field twice, maybe with another value
        twin = draw(st.sampled_from(fields))
        fields.append((twin[0], draw(st.sampled_from([twin[1], '"F16"', "[1]", "[0, 2]"]))))
    fields = draw(st.permutations(fields))
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}", end


@st.composite
def tiled_files(draw: st.DrawFn) -> bytes:
    """Headers that tile the data as safetensors writes them, then disturbed: names twice
    (also as escapes), gaps and overlaps, zero-size tensors anywhere, metadata, entries in
    any order, trailing or missing bytes."""
    pairs, at, end = [], 0, 0
    for i in range(draw(st.integers(0, 4))):
        at += draw(st.sampled_from([0, 0, 0, 0, 0, -4, -1, 1, 8]))  # a gap or an overlap
        text, at = draw(entry_text(max(at, 0)))
        twice = i > 0 and draw(st.integers(0, 5)) == 3  # (not 0: hypothesis favours ends)
        pairs.append((draw(st.sampled_from(TWICE)) if twice else f'"t{i}"', text))
        end = max(end, at)
    metadata = ['{"format":"pt"}', '{"k":"1","k":"2"}', '{"k":1}', "null", "[]"]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        pairs.append(('"__metadata__"', draw(st.sampled_from(metadata))))
    pairs = draw(st.permutations(pairs))
    size = max(0, end + draw(st.sampled_from([0, 0, 0, 0, 1, 8, -1])))
    data = (bytes(range(251)) * (size // 251 + 1))[:size]  # each byte says where it is
    return raw_file(pairs, data)


def tensor(start: int, end: int, dtype: str = "F32") -> str:
    n = (end - start) // itemsize(dtype)
    return json.dumps({"dtype": dtype, "shape": [n], "data_offsets": [start, end]})


def raw_file(pairs: list[tuple[str, str]], data: bytes = b"") -> bytes:
    """A safetensors file from its header's (key, value) JSON texts: a key may come twice."""
    header = "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
    return struct.pack("<Q", len(header)) + header.encode() + data


@FUZZ
@given(tiled_files())
@example(raw_file([('"a"', tensor(0, 4)), ('"a"', tensor(0, 4))], bytes(4)))  # safetensors: ok
@example(raw_file([('"a"', tensor(0, 4)), ('"\\u0061"', tensor(0, 4, "I32"))], bytes(4)))
@example(raw_file([('"a"', tensor(0, 4)), ('"z"', tensor(0, 0, "F16"))], bytes(4)))  # both read
def test_safetensors_names_twice_gaps_and_overlaps(data: bytes) -> None:
    check_safetensors(data)


def test_tiled_files_are_read() -> None:
    """The fuzzer's undisturbed files are good ones: the property is not met by refusing."""
    pairs = [
        ('"__metadata__"', '{"format":"pt"}'),
        ('"b"', tensor(4, 8)),
        ('"z"', tensor(4, 4, "F16")),
        ('"a"', tensor(0, 4)),
    ]
    assert check_safetensors(raw_file(pairs, bytes(range(8))))


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


# Views of a few storages (tied and overlapping views are fine), keyed by a few names.
BASE = torch.arange(12, dtype=torch.float32).reshape(3, 4)
TENSORS = [
    BASE,
    BASE[1:],
    BASE.t(),
    BASE[0],
    torch.ones(2).half(),
    torch.empty(0, 3),
    torch.tensor(7),
]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, len(TENSORS) - 1)), max_size=5))
def test_bin_keys_twice(pairs: list[tuple[str, int]]) -> None:
    """A pickle setting a key twice is refused; else each tensor reads as torch.save got it."""
    buf = io.BytesIO()
    torch.save(DupState([(k, TENSORS[i]) for k, i in pairs]), buf)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.bin"
        path.write_bytes(buf.getvalue())
        names = [k for k, _ in pairs]
        try:
            refs = read_bin(path)
        except InputError as e:
            assert len(set(names)) < len(names) and "is set twice in one dict" in str(e)
            return
        assert list(refs) == names
        with MappedReader() as reader:
            for name, i in pairs:
                assert torch.equal(reader.rows(refs[name], 0, refs[name].rows), TENSORS[i])


def test_valid_inputs_still_parse() -> None:
    """The fuzzers' seeds are good files: the property is not met by refusing everything."""
    refs = parse(read_bin, VALID_BIN, ".bin")
    assert refs is not None and set(refs) == {"a", "b", "c"}
    assert parse(read_bin, _with_pickle(VALID_PKL), ".bin") is not None


def test_forged_memo_index_is_refused_before_allocating() -> None:
    # LONG_BINPUT 0xFFFFFFF0: the C unpickler would size its memo for four billion entries.
    pkl = b"\x80\x02}r\xf0\xff\xff\xff."
    assert parse(read_bin, _with_pickle(pkl), ".bin") is None
