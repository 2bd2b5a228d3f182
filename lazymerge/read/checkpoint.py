"""A checkpoint as an index of tensor references: a model directory (one file, or shards
and their index json; safetensors or `.bin`) or a single weights file.

Nothing here reads tensor data: only the safetensors headers (safetensors.py) or a
`.bin`'s pickled tensor records (torchzip.py) are parsed and checked against the file
sizes. The bytes are read later, through mapped.py.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from lazymerge.errors import InputError
from lazymerge.read.gguf import header_bytes, is_gguf
from lazymerge.read.gguf_model import gguf_tensors
from lazymerge.read.safetensors import JsonObject, load_json, read_header
from lazymerge.read.tensorref import TensorRef
from lazymerge.read.torchzip import is_torch_zip, metadata_digest, read_bin

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"


def read_tensor_file(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one weights file: safetensors, a torch.save zip (.bin), or
    a llama.cpp GGUF (under transformers' names)."""
    if is_gguf(path):
        return gguf_tensors(path)
    if path.suffix in (".bin", ".pt", ".pth") or is_torch_zip(path):
        return read_bin(path)
    return read_header(path)


def header_digest(path: Path) -> str:
    """sha256 of a weights file's metadata (safetensors or GGUF header, .bin data.pkl)."""
    if is_gguf(path):
        return hashlib.sha256(header_bytes(path)).hexdigest()
    if path.suffix in (".bin", ".pt", ".pth") or is_torch_zip(path):
        return metadata_digest(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(n)).hexdigest()


class CheckpointIndex:
    """name -> TensorRef for a whole checkpoint (one file, or shards + index json)."""

    def __init__(self, path: Path, tensors: dict[str, TensorRef], fmt: str, note: str = "") -> None:
        self.path = path
        self.tensors = tensors
        self.format = fmt  # "safetensors", "bin" or "gguf"
        self.note = note  # e.g. which format was chosen when both are present

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointIndex:
        """Open a checkpoint directory or a single weights file, metadata only.

        A directory with both safetensors and `.bin` weights is read as safetensors.
        """
        p = Path(path)
        if p.is_file():
            refs = read_tensor_file(p)
            return cls(p, refs, _file_format(p))
        if not p.is_dir():
            raise InputError(f"{p}: no such checkpoint (not a file or directory)")
        safetensors = _open_dir(p, SAFETENSORS_INDEX, SINGLE_FILE)
        has_bin = (p / BIN_INDEX).is_file() or (p / BIN_FILE).is_file()
        if safetensors is not None:
            note = "safetensors (its .bin weights are ignored)" if has_bin else ""
            return cls(p, safetensors, "safetensors", note)
        if has_bin:
            bins = _open_dir(p, BIN_INDEX, BIN_FILE)
            assert bins is not None  # has_bin says one of the two files is there
            return cls(p, bins, "bin")
        raise InputError(
            f"{p}: no {SINGLE_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX} found; "
            "is this a Hugging Face checkpoint directory?"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(r.file for r in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())


def _file_format(path: Path) -> str:
    if is_gguf(path):
        return "gguf"
    return "bin" if path.suffix != ".safetensors" and is_torch_zip(path) else "safetensors"


def _open_dir(directory: Path, index_name: str, single: str) -> dict[str, TensorRef] | None:
    if (directory / index_name).is_file():
        return _open_sharded(directory, directory / index_name)
    if (directory / single).is_file():
        return read_tensor_file(directory / single)
    return None


def _open_sharded(directory: Path, index_path: Path) -> dict[str, TensorRef]:
    weight_map = _weight_map(index_path)
    headers = {
        shard: read_tensor_file(_shard_path(directory, index_path, shard))
        for shard in sorted(set(weight_map.values()))
    }
    # The weight map is the checkpoint: a tensor a shard holds but the map does not list
    # is not part of the model. (transformers' from_pretrained loads every tensor of every
    # listed shard; such a stray tensor is then an unexpected key, or one it reads.)
    holders: dict[str, str] = {}
    tensors: dict[str, TensorRef] = {}
    for shard, header in headers.items():
        for name, ref in header.items():
            if name in holders:
                raise InputError(_held_twice(index_path, name, holders[name], shard, weight_map))
            holders[name] = shard
            if weight_map.get(name) == shard:
                tensors[name] = ref
    for name, shard in weight_map.items():
        if name not in tensors:
            raise InputError(
                f"{index_path}: tensor {name!r} is listed in {shard} but that shard "
                "does not contain it"
            )
    return tensors


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = load_json(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        raise InputError(f"{index_path}: not a valid index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, JsonObject):
        raise InputError(f"{index_path}: weight_map is not a JSON object")
    if "weight_map" in index.repeated:
        raise InputError(
            f"{index_path}: 'weight_map' appears {len(index.repeated['weight_map'])} times; "
            "keep one"
        )
    for name, shards in weight_map.repeated.items():
        same = all(shard == shards[0] for shard in shards)
        where = f"each time in {shards[0]}" if same else " and ".join(map(str, shards))
        raise InputError(
            f"{index_path}: tensor {name!r} is listed {len(shards)} times in weight_map "
            f"({where}); list each tensor once, in the shard that holds it"
        )
    for shard in weight_map.values():
        if not isinstance(shard, str):  # (and unhashable: [1] would break set())
            raise InputError(
                f"{index_path}: shard name {shard!r} must be a file name inside {index_path.parent}"
            )
    return weight_map


def _held_twice(
    index_path: Path, name: str, first: str, second: str, weight_map: dict[str, str]
) -> str:
    # Which copy is the model's? The map names one; transformers' from_pretrained loads
    # both shards and keeps the last one's copy (shards in sorted order), whatever the
    # map says, and its load_sharded_checkpoint keeps whichever it loads last: refuse.
    listed = weight_map.get(name)
    says = f"the index lists it in {listed}" if listed is not None else "the index omits it"
    return (
        f"{index_path}: tensor {name!r} is in two shards, {first} and {second} ({says}; "
        f"transformers would load the copy in {second}); remove the stray copy from one shard"
    )


def _shard_path(directory: Path, index_path: Path, shard: object) -> Path:
    # An index is input from a stranger: it may only name files inside its own directory.
    if not isinstance(shard, str) or not shard or Path(shard).name != shard:
        raise InputError(
            f"{index_path}: shard name {shard!r} must be a file name inside {directory}"
        )
    path = directory / shard
    if not path.is_file():
        raise InputError(f"{index_path}: shard {shard} is missing from {directory}")
    return path
