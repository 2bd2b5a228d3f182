from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lazymerge.errors import InputError
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.read.mapped import MappedReader
from lazymerge.read.safetensors import read_header


def raw_file(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def test_index_agrees_with_safetensors_and_views_are_zero_copy(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(5, 3, dtype=torch.float32),
        "b": torch.randn(4, 6).to(torch.bfloat16),
        "c": torch.randn(7).to(torch.float16),
        "s": torch.tensor(3.5, dtype=torch.float32),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    f = tmp_path / "model.safetensors"
    save_file(tensors, str(f))
    index = CheckpointIndex.open(tmp_path)
    assert set(index.tensors) == set(tensors)
    with safe_open(str(f), "pt") as st, MappedReader() as reader:
        for name in tensors:
            ref = index[name]
            expected = st.get_tensor(name)
            assert ref.shape == tuple(expected.shape)
            whole = reader.rows(ref, 0, ref.rows)
            assert torch.equal(whole, expected)
            assert whole.dtype == expected.dtype
        rows = reader.rows(index["b"], 1, 3)
        assert torch.equal(rows, tensors["b"][1:3])
        reader.release(index["b"])  # dropping pages must not lose data
        assert torch.equal(reader.rows(index["b"], 0, 4), tensors["b"])


def test_sharded_checkpoint(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, str(tmp_path / "m-1.safetensors"))
    save_file({"y": torch.zeros(3)}, str(tmp_path / "m-2.safetensors"))
    weight_map = {"x": "m-1.safetensors", "y": "m-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    index = CheckpointIndex.open(tmp_path)
    assert index["x"].file.name == "m-1.safetensors"
    assert index["y"].shape == (3,)
    assert len(index.files) == 2


@pytest.mark.parametrize(
    ("header", "data", "header_len", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "the file is truncated"),
        ({}, b"", 10_000, "header length 10000 is larger than the file"),
        (b"not json at all", b"", None, "header is not valid UTF-8 JSON"),
        (b"\xff\xfe\x00\x01", b"", None, "header is not valid UTF-8 JSON"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, None, "spans 12 bytes but F32 [4] needs 16"),
        ({"t": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 16, None, "unknown dtype 'Q4'"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "malformed shape"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "malformed data_offsets"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, "tensor 'b' overlaps",
        ),
    ],
)  # fmt: skip
def test_malformed_headers_are_named(
    tmp_path: Path, header: object, data: bytes, header_len: int | None, message: str
) -> None:
    f = raw_file(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(InputError, match=re.escape("model.safetensors")) as e:
        read_header(f)
    assert message in str(e.value)


def test_tiny_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(InputError, match="not a safetensors file"):
        CheckpointIndex.open(tmp_path)


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_may_not_point_outside_its_directory(tmp_path: Path, shard: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"t": shard}}))
    with pytest.raises(InputError, match="must be a file name inside"):
        CheckpointIndex.open(tmp_path)


def test_index_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, str(tmp_path / "m-1.safetensors"))
    weight_map = {"x": "m-1.safetensors", "ghost": "m-1.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        InputError,
        match=re.escape("'ghost' is listed in m-1.safetensors but that shard does not contain it"),
    ):
        CheckpointIndex.open(tmp_path)


def test_missing_shard_and_missing_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"t": "gone.safetensors"}})
    )
    with pytest.raises(InputError, match=re.escape("shard gone.safetensors is missing")):
        CheckpointIndex.open(tmp_path)
    with pytest.raises(InputError, match="no such checkpoint"):
        CheckpointIndex.open(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        InputError,
        match=re.escape(
            "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json found"
        ),
    ):
        CheckpointIndex.open(empty)
