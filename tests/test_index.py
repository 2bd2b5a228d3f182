from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from test_hostile import CASES, refused

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


# Ambiguous (and malformed) files: what we refuse, and what safetensors does with each.


def entry(start: int, end: int, dtype: str = "F32", shape: list[int] | None = None) -> str:
    size = {"F32": 4, "I32": 4, "F16": 2}[dtype]
    dims = [(end - start) // size] if shape is None else shape
    return json.dumps({"dtype": dtype, "shape": dims, "data_offsets": [start, end]})


def reference(path: Path) -> dict[str, tuple[str, list[int], bytes]] | str:
    """What safetensors reads from a file: name -> (dtype, shape, bytes), or why it refuses."""
    try:
        with safe_open(str(path), "pt") as st:
            out = {}
            for name in st.keys():  # noqa: SIM118 (safe_open is no dict)
                t = st.get_tensor(name)
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                out[name] = (st.get_slice(name).get_dtype(), list(t.shape), raw)
            return out
    except SafetensorError as e:
        return str(e)


def ours(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    data = path.read_bytes()
    return {
        r.name: (r.dtype, list(r.shape), data[r.offset : r.offset + r.nbytes])
        for r in read_header(path).values()
    }


ONE, TWO, THREE = (struct.pack(f"<{n}f", *range(1, n + 1)) for n in (1, 2, 3))
Z = json.dumps({"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})
SAFETENSORS_REFUSES = ""
# Each file: what we say, and "" where safetensors refuses it too, or why we are stricter.
AMBIGUOUS = {
    "tensor twice, two entries": (
        f'{{"a":{entry(0, 4)},"a":{entry(4, 8)}}}', TWO, "tensor 'a' appears 2 times in the header",
        SAFETENSORS_REFUSES,  # it keeps the last entry, which then leaves bytes 0-4 to nobody
    ),
    "tensor twice, the last entry tiles": (
        f'{{"a":{entry(0, 4, "I32")},"a":{entry(0, 4)}}}', ONE, "tensor 'a' appears 2 times",
        "safetensors silently reads the last entry (F32); a reader keeping the first reads I32",
    ),
    "tensor twice, the same entry": (
        f'{{"a":{entry(0, 4)},"a":{entry(0, 4)}}}', ONE, "tensor 'a' appears 2 times",
        "harmless here, but the same rule as a differing entry keeps the check simple to state",
    ),
    "tensor twice, once as an escape": (
        f'{{"a":{entry(0, 4, "I32")},"\\u0061":{entry(0, 4)}}}', ONE, "tensor 'a' appears 2 times",
        "a tool comparing raw key text sees two tensors, safetensors reads one (the last)",
    ),
    "a key twice in an entry": (
        '{"a":{"dtype":"F16","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', ONE,
        "tensor 'a' has key 'dtype' 2 times in the header", SAFETENSORS_REFUSES,
    ),
    "metadata twice": (
        f'{{"__metadata__":{{}},"__metadata__":{{}},"a":{entry(0, 4)}}}', ONE,
        "'__metadata__' appears 2 times in the header", SAFETENSORS_REFUSES,
    ),
    "a metadata key twice": (
        f'{{"__metadata__":{{"k":"1","k":"2"}},"a":{entry(0, 4)}}}', ONE,
        "'__metadata__' has key 'k' 2 times in the header",
        "safetensors keeps the last value; which one a tool shows is up to its JSON parser",
    ),
    "metadata not strings": (
        f'{{"__metadata__":{{"k":1}},"a":{entry(0, 4)}}}', ONE,
        "'__metadata__' must map names to strings, not {'k': 1}", SAFETENSORS_REFUSES,
    ),
    "a gap between tensors": (
        f'{{"a":{entry(0, 4)},"b":{entry(8, 12)}}}', THREE,
        "data offsets 4 to 8, before tensor 'b', belong to no tensor (safetensors refuses gaps)",
        SAFETENSORS_REFUSES,
    ),
    "data not starting at 0": (
        f'{{"a":{entry(4, 8)}}}', TWO,
        "data offsets 0 to 4, before tensor 'a', belong to no tensor", SAFETENSORS_REFUSES,
    ),
    "bytes after the last tensor": (
        f'{{"a":{entry(0, 4)}}}', TWO,
        "the last 4 bytes of the file belong to no tensor (safetensors refuses trailing bytes)",
        SAFETENSORS_REFUSES,
    ),
    "bytes after an empty header": (
        "{}", b"xx", "the last 2 bytes of the file belong to no tensor", SAFETENSORS_REFUSES,
    ),
    "a zero-size tensor inside another": (
        f'{{"a":{entry(0, 8)},"z":{Z.replace("[0, 0]", "[4, 4]")}}}', TWO,
        "tensor 'z' overlaps the tensor before it ('a', which ends at data offset 8)",
        SAFETENSORS_REFUSES,
    ),
    "true as a size": (
        '{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', ONE,
        "tensor 'a' has a malformed shape [True]", SAFETENSORS_REFUSES,
    ),
    "-0 as a size": (
        '{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"",
        "tensor 'a' has a malformed shape [-0.0]", SAFETENSORS_REFUSES,
    ),
    "a 400-digit size": (
        '{"a":{"dtype":"F32","shape":[%s],"data_offsets":[0,4]}}' % ("9" * 400), ONE,
        "tensor 'a' has a malformed shape [inf]", SAFETENSORS_REFUSES,
    ),
    "a 5000-digit size": (
        '{"a":{"dtype":"F32","shape":[%s],"data_offsets":[0,4]}}' % ("9" * 5000), ONE,
        "header is not valid UTF-8 JSON (Exceeds the limit", SAFETENSORS_REFUSES,
    ),
    "a shape past 2**64 elements": (
        '{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b"",
        "tensor 'a' has a shape too large", SAFETENSORS_REFUSES,
    ),
    "NaN in the header": (
        f'{{"a":{entry(0, 4)[:-1]},"x":NaN}}}}', ONE, "header is not valid UTF-8 JSON (NaN",
        SAFETENSORS_REFUSES,
    ),
    "a lone surrogate in a name": (
        f'{{"\\ud800":{entry(0, 4)}}}', ONE, "header is not valid UTF-8 JSON", SAFETENSORS_REFUSES,
    ),
    "JSON nested too deeply": (
        '{"a":' + "[" * 5000 + "]" * 5000 + "}", b"", "header is not valid UTF-8 JSON",
        SAFETENSORS_REFUSES,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_ambiguous_headers_are_refused(case: str, tmp_path: Path) -> None:
    text, data, message, stricter = AMBIGUOUS[case]
    f = raw_file(tmp_path / "model.safetensors", text.encode(), data)
    with pytest.raises(InputError) as e:
        read_header(f)
    assert str(e.value).startswith(f"{f}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    verdict = reference(f)
    if stricter:  # safetensors reads one of the readings without a word
        assert isinstance(verdict, dict), verdict
    else:
        assert isinstance(verdict, str), verdict


def test_layout_refusals_say_how_to_fix(tmp_path: Path) -> None:
    for case in (
        "tensor twice, two entries",
        "a gap between tensors",
        "bytes after the last tensor",
    ):
        text, data, _, _ = AMBIGUOUS[case]
        f = raw_file(tmp_path / "model.safetensors", text.encode(), data)
        with pytest.raises(InputError, match=r"; re-save it with safetensors\.torch\.save_file$"):
            read_header(f)


def zero(at: int, dims: tuple[int, ...] = (0,)) -> str:
    return json.dumps({"dtype": "F16", "shape": list(dims), "data_offsets": [at, at]})


# Files safetensors reads: we read them too, the same tensors from the same bytes.
ACCEPTED = {
    # (the header's order is not the sort's: this one was refused as an overlap once)
    "zero-size listed after the tensor at its offset": (f'{{"a":{entry(0, 4)},"z":{zero(0)}}}', ONE),
    "zero-size before": (f'{{"z":{zero(0)},"a":{entry(0, 4)}}}', ONE),
    "several zero-size at one offset": (
        f'{{"a":{entry(0, 4)},"y":{zero(4, (2, 0))},"b":{entry(4, 8)},"z":{zero(4)}}}', TWO,
    ),
    "zero-size at the end": (f'{{"a":{entry(0, 4)},"z":{zero(4)}}}', ONE),
    "only zero-size tensors": (f'{{"y":{zero(0)},"z":{zero(0, (3, 0))}}}', b""),
    "no tensors": ("{}", b""),
    "null metadata": (f'{{"__metadata__":null,"a":{entry(0, 4)}}}', ONE),
    "padded and indented": (f' \n{{"a": {entry(0, 4)}}}' + " " * 7, ONE),
    "unknown fields": (f'{{"a":{entry(0, 4)[:-1]},"x":[1,{{"y":2}}]}}}}', ONE),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_files_safetensors_reads_are_read_alike(case: str, tmp_path: Path) -> None:
    text, data = ACCEPTED[case]
    f = raw_file(tmp_path / "model.safetensors", text.encode(), data)
    assert ours(f) == reference(f)


def test_files_safetensors_writes_are_read_alike(tmp_path: Path) -> None:
    tensors = {
        "z": torch.empty(0),
        "a": torch.randn(2, 3),
        "y": torch.empty(0, 3).half(),
        "b": torch.zeros(1, dtype=torch.int64),
        "e": torch.empty(2, 0).bfloat16(),
        "s": torch.tensor(True),
    }
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    save_file({"z": torch.empty(0)}, str(tmp_path / "b.safetensors"))
    save_file({}, str(tmp_path / "c.safetensors"))
    # Tied weights: save_model keeps one copy of a shared tensor.
    from safetensors.torch import save_model

    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    save_model(model, str(tmp_path / "d.safetensors"))
    for f in sorted(tmp_path.glob("*.safetensors")):
        assert ours(f) == reference(f), f.name
    assert set(ours(tmp_path / "a.safetensors")) == set(tensors)


def write_index(directory: Path, text: str) -> Path:
    (directory / "model.safetensors.index.json").write_text(text)
    return directory / "model.safetensors.index.json"


def two_shards(directory: Path) -> None:
    save_file({"x": torch.ones(2)}, str(directory / "m-1.safetensors"))
    save_file({"y": torch.zeros(3)}, str(directory / "m-2.safetensors"))


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        (
            '{"x": "m-1.safetensors", "y": "m-2.safetensors", "x": "m-2.safetensors"}',
            "tensor 'x' is listed 2 times in weight_map (m-1.safetensors and m-2.safetensors); "
            "list each tensor once, in the shard that holds it",
        ),
        (
            '{"x": "m-1.safetensors", "y": "m-2.safetensors", "x": "m-1.safetensors"}',
            "tensor 'x' is listed 2 times in weight_map (each time in m-1.safetensors)",
        ),
        (
            '{"x": "m-1.safetensors", "y": ["m-2.safetensors"]}',
            "shard name ['m-2.safetensors'] must",
        ),
    ],
)
def test_index_listing_a_tensor_twice_is_refused(
    tmp_path: Path, weight_map: str, message: str
) -> None:
    two_shards(tmp_path)
    index = write_index(tmp_path, f'{{"metadata": {{}}, "weight_map": {weight_map}}}')
    with pytest.raises(InputError) as e:
        CheckpointIndex.open(tmp_path)
    assert str(e.value).startswith(f"{index}: ") and message in str(e.value)
    # transformers reads the index with json.loads: the last listing wins without a word.
    if "listed" in message:
        last = re.findall(r'"x": "([^"]+)"', weight_map)[-1]
        assert json.loads(index.read_text())["weight_map"]["x"] == last


def test_index_with_two_weight_maps_is_refused(tmp_path: Path) -> None:
    two_shards(tmp_path)
    write_index(
        tmp_path, '{"weight_map": {"x": "m-1.safetensors"}, "weight_map": {"y": "m-2.safetensors"}}'
    )
    with pytest.raises(InputError, match="'weight_map' appears 2 times; keep one"):
        CheckpointIndex.open(tmp_path)


@pytest.mark.parametrize("listed", ["m-1.safetensors", "m-2.safetensors"])
def test_tensor_in_two_shards_is_refused(tmp_path: Path, listed: str) -> None:
    save_file({"x": torch.ones(2), "n": torch.full((2,), 5.0)}, str(tmp_path / "m-1.safetensors"))
    save_file({"y": torch.zeros(3), "n": torch.full((2,), 9.0)}, str(tmp_path / "m-2.safetensors"))
    weight_map = {"x": "m-1.safetensors", "y": "m-2.safetensors", "n": listed}
    index = write_index(tmp_path, json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError) as e:
        CheckpointIndex.open(tmp_path)
    assert str(e.value) == (
        f"{index}: tensor 'n' is in two shards, m-1.safetensors and m-2.safetensors (the index "
        f"lists it in {listed}; transformers would load the copy in m-2.safetensors); remove the "
        "stray copy from one shard"
    )


def test_transformers_loads_the_last_shards_copy_whatever_the_map_says(tmp_path: Path) -> None:
    """Why a tensor in two shards is refused rather than read from the shard the map names:
    transformers (the reference for these directories) reads the other copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    state = {k: v.contiguous() for k, v in LlamaForCausalLM(config).state_dict().items()}
    names = sorted(state)
    first = {n: state[n] for n in names[: len(names) // 2]}
    second = {n: state[n] for n in names[len(names) // 2 :]}
    norm = "model.norm.weight"
    first[norm], second[norm] = torch.full((8,), 5.0), torch.full((8,), 9.0)
    save_file(first, str(tmp_path / "m-1.safetensors"))
    save_file(second, str(tmp_path / "m-2.safetensors"))
    config.save_pretrained(tmp_path)
    weight_map = {
        **dict.fromkeys(first, "m-1.safetensors"),
        **dict.fromkeys(second, "m-2.safetensors"),
    }
    weight_map[norm] = "m-1.safetensors"  # the map names the first copy ...
    write_index(tmp_path, json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.norm.weight[0].item() == 9.0  # ... transformers loads the second
    with pytest.raises(InputError, match=re.escape("tensor 'model.norm.weight' is in two shards")):
        CheckpointIndex.open(tmp_path)


def test_unlisted_tensor_in_one_shard_is_not_part_of_the_model(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2), "stray": torch.ones(1)}, str(tmp_path / "m-1.safetensors"))
    write_index(tmp_path, json.dumps({"weight_map": {"x": "m-1.safetensors"}}))
    assert set(CheckpointIndex.open(tmp_path).tensors) == {"x"}


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("ambiguous:")])
def test_inspect_refuses_ambiguous_checkpoints(
    case: str, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`inspect` on the checkpoints test_hostile's CASES give to `gradient`."""
    build, message = CASES[case]
    args, _ = build(models, tmp_path)
    base = args[1]  # ["gradient", base, other, ...]
    refused(capsys, ["inspect", base], [base], None, message)


def test_dtype_sizes_agree_with_torch() -> None:
    """Headers are sized without torch (tensorref.ITEMSIZE); the bytes are read as torch's
    dtypes (mapped.DTYPES): the two tables must say the same."""
    from lazymerge.read.mapped import DTYPES
    from lazymerge.read.tensorref import ITEMSIZE

    assert {code: dtype.itemsize for code, dtype in DTYPES.items()} == ITEMSIZE


def mapped_rss(path: Path) -> int:
    """Bytes of `path`'s pages mapped into this process now (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc/self/smaps")
def test_released_rows_leave_no_pages_mapped(tmp_path: Path) -> None:
    """Rows read in chunks that start anywhere in a page, each released once read: the
    pages a fault maps around the next chunk's first row (the end of the chunk before,
    released already) go too, so the mapped pages stay within a chunk's, not a tensor's."""
    cols = 25_000  # 50 KB rows of fp16: chunk boundaries off every page and 64 KiB window
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1200, cols, dtype=torch.float16)}, str(f))  # 60 MB
    fd = os.open(f, os.O_RDONLY)
    try:  # out of the page cache, then read back: in large folios, as a merge finds it
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 2**20):
            pass
    finally:
        os.close(fd)
    ref = CheckpointIndex.open(tmp_path)["w"]
    with MappedReader() as reader:
        for r0 in range(0, ref.rows, 7):  # 350 KB chunks
            r1 = min(r0 + 7, ref.rows)
            assert float(reader.rows(ref, r0, r1).float().sum()) == 0
            reader.release(ref, r0 * ref.row_nbytes, r1 * ref.row_nbytes)
            assert mapped_rss(f) < 4 * 2**20, r0
