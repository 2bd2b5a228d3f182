"""A GGUF file's header, parsed and checked by hand: its metadata (keys, value types,
values) and every tensor's name, dimensions, llama.cpp type and exact byte range,
validated against the file's size before any data is read, as read/safetensors.py does
for safetensors. gguf-py supplies the constants (value and tensor types, block sizes);
its GGUFReader is the tests' reference, not our parser: it maps the whole file through
numpy and a hostile count or length fails there in ways no user can act on.

What is refused is what llama.cpp's gguf.cpp refuses (bad magic, version, key or tensor
name given twice, an unknown type, a dimension count over 4, a row not a whole number of
blocks, an offset off the alignment, data past the end of the file), plus overlapping
tensor data, nested arrays and keys that are not UTF-8. The layout: magic "GGUF", u32
version (2 or 3), u64 tensor count, u64 key count, the keys (string, u32 value type,
value), the tensor infos (string name, u32 dimension count, u64 dimensions innermost
first, u32 type, u64 offset from the data start), then the data, aligned to
`general.alignment` (32 unless set).
"""

from __future__ import annotations

import functools
import itertools
import mmap
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted in u32; llama.cpp reads 2 and 3
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> struct format of its scalar; STRING 8 and ARRAY 9 are read apart.
SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9
SPLIT_NO, SPLIT_COUNT = "split.no", "split.count"  # a split GGUF's keys (gguf-split)


@dataclass(frozen=True)
class Field:
    """One metadata value with its GGUF value type (and an array's item type)."""

    value: Any  # int, float, bool, str (bytes if not UTF-8), or a list of those
    vtype: int
    item_type: int | None = None


@dataclass(frozen=True)
class GgufTensor:
    """One tensor as the file declares it: dims innermost first, as llama.cpp's ne."""

    name: str
    dims: tuple[int, ...]
    qtype: int
    offset: int  # absolute, in the file
    nbytes: int
    path: Path  # the file (of a split GGUF's files) that holds it

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape (outermost first), as transformers and safetensors write it."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GgufFile:
    path: Path
    version: int
    fields: dict[str, Field]
    tensors: tuple[GgufTensor, ...]  # in the file's order
    data_start: int

    def get(self, key: str) -> Any:
        field = self.fields.get(key)
        return None if field is None else field.value


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic (or is named .gguf)."""
    if path.suffix == ".gguf":
        return True
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return False  # (every shard of a checkpoint asks: no open for those)
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: Path) -> GgufFile:
    """Parse and validate a GGUF file's header; data is not read. (Parsed once per
    version of the file: a merge asks for its tensors, config and fingerprint.)"""
    try:
        stat = path.stat()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    return _read(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read(path: Path, mtime_ns: int, size: int) -> GgufFile:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise InputError(f"{path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _parse(path, _Cursor(path, m), size)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def header_bytes(path: Path) -> bytes:
    """The header of one GGUF file, up to its data: what a fingerprint of it hashes."""
    g = read_gguf(path)
    with open(path, "rb") as f:
        return f.read(g.data_start)


def read_model(path: Path) -> GgufFile:
    """A GGUF model: one file, or (`path` its first split) every split of it together:
    the first file's metadata, every file's tensors."""
    files = split_files(path)
    if len(files) == 1:
        return files[0]
    tensors = tuple(t for g in files for t in g.tensors)
    if len({t.name for t in tensors}) < len(tensors):
        raise InputError(f"{path}: a tensor is in two of its split files; the files are damaged")
    return replace(files[0], tensors=tensors)


def split_files(path: Path) -> tuple[GgufFile, ...]:
    """The files of the GGUF whose first file is `path`: itself, or its splits, found by
    llama.cpp's gguf-split names (`<prefix>-00001-of-00003.gguf`) and checked by their
    split.no, split.count and split.tensors.count keys."""
    first = read_gguf(path)
    count = first.get(SPLIT_COUNT)
    if count is None or count == 1:
        return (first,)
    m = re.fullmatch(r"(.+)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if first.get(SPLIT_NO) != 0 or m is None or int(m.group(3)) != count:
        raise InputError(
            f"{path}: split {first.get(SPLIT_NO)} of a {count}-file GGUF; name the first "
            "file, <name>-00001-of-<count>.gguf, and keep the others beside it"
        )
    files = [first]
    for i in range(1, count):
        other = path.with_name(f"{m.group(1)}-{i + 1:05d}-of-{count:05d}.gguf")
        if not other.is_file():
            raise InputError(f"{path}: split file {other.name} is missing beside it")
        g = read_gguf(other)
        if (g.get(SPLIT_NO), g.get(SPLIT_COUNT)) != (i, count):
            raise InputError(f"{other}: its split keys do not say file {i + 1} of {count}")
        files.append(g)
    total = sum(len(g.tensors) for g in files)
    if first.get("split.tensors.count") != total:
        raise InputError(
            f"{path}: split.tensors.count is {first.get('split.tensors.count')} but the "
            f"{count} files hold {total} tensors; a file is damaged or from another model"
        )
    return tuple(files)


def _parse(path: Path, cur: _Cursor, size: int) -> GgufFile:
    if cur.take(4) != MAGIC:
        raise InputError(f"{path}: not a GGUF file (no GGUF magic)")
    version = cur.scalar("I", "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        why = "a big-endian GGUF" if swapped in VERSIONS else f"GGUF version {version}"
        raise InputError(f"{path}: {why}, which lazymerge does not read (versions 2 and 3)")
    n_tensors, n_fields = cur.scalar("Q", "tensor count"), cur.scalar("Q", "key count")
    fields: dict[str, Field] = {}
    for _ in range(cur.bounded(n_fields, 13, "keys")):
        key = cur.text("a key")
        if key in fields:
            raise InputError(f"{path}: key {key!r} appears twice; llama.cpp refuses that")
        fields[key] = cur.field(key)
    infos = [cur.tensor_info() for _ in range(cur.bounded(n_tensors, 24, "tensors"))]
    alignment = _alignment(path, fields.get("general.alignment"))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = _placed(path, infos, data_start, alignment, size)
    return GgufFile(path, version, fields, tensors, data_start)


def _alignment(path: Path, field: Field | None) -> int:
    if field is None:
        return DEFAULT_ALIGNMENT
    value = field.value
    if field.vtype != 4 or value == 0 or value & (value - 1):
        raise InputError(
            f"{path}: general.alignment is {value!r}; llama.cpp needs a power of two as a u32"
        )
    return int(value)


def _placed(
    path: Path, infos: list[tuple[str, tuple[int, ...], int, int]], start: int, align: int,
    size: int,
) -> tuple[GgufTensor, ...]:  # fmt: skip
    """Each tensor's absolute byte range, checked: aligned, whole blocks, inside the file,
    no two overlapping, no name twice."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    sizes = {int(t): s for t, s in GGML_QUANT_SIZES.items()}
    out: dict[str, GgufTensor] = {}
    for name, dims, qtype, offset in infos:
        if name in out:
            raise InputError(f"{path}: tensor {name!r} appears twice; llama.cpp refuses that")
        if qtype not in sizes:
            raise InputError(
                f"{path}: tensor {name!r} has type {qtype}, which GGUF does not define"
            )
        block, type_size = sizes[qtype]
        tname = GGMLQuantizationType(qtype).name
        if dims[0] % block:
            raise InputError(
                f"{path}: tensor {name!r}'s rows of {dims[0]} are not whole {tname} blocks "
                f"of {block}"
            )
        nbytes = dims[0] // block * type_size
        for d in dims[1:]:
            nbytes *= d
        if offset % align or start + offset + nbytes > size:
            where = "is not aligned" if offset % align else "runs past the end of the file"
            raise InputError(
                f"{path}: tensor {name!r}'s data (offset {offset}, {nbytes} bytes) {where}; "
                "the file is truncated or damaged"
            )
        out[name] = GgufTensor(name, dims, qtype, start + offset, nbytes, path)
    _check_overlaps(path, list(out.values()))
    return tuple(out.values())


def _check_overlaps(path: Path, tensors: list[GgufTensor]) -> None:
    ordered = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    for a, b in itertools.pairwise(ordered):
        if a.offset + a.nbytes > b.offset:
            raise InputError(
                f"{path}: tensors {a.name!r} and {b.name!r} share bytes; the file is damaged"
            )


class _Cursor:
    """Reads the header's little-endian values, each checked against the file's end."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def _short(self, what: str) -> InputError:
        return InputError(
            f"{self.path}: the header ends inside {what} (at byte {self.pos} of "
            f"{len(self.buf)}); the file is truncated or not GGUF"
        )

    def take(self, n: int, what: str = "the magic") -> bytes:
        if n > len(self.buf) - self.pos:
            raise self._short(what)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def bounded(self, count: int, least: int, what: str) -> int:
        """`count` entries of at least `least` bytes each must fit in what is left."""
        if count > (len(self.buf) - self.pos) // least:
            raise InputError(
                f"{self.path}: the header declares {count} {what}, more than its "
                f"{len(self.buf)} bytes can hold; the file is damaged or not GGUF"
            )
        return count

    def string(self, what: str) -> bytes:
        n = self.scalar("Q", what)
        return self.take(self.bounded(n, 1, f"bytes in {what}"), what)

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: {what} {raw[:40]!r} is not UTF-8") from None

    def field(self, key: str) -> Field:
        vtype = self.scalar("I", f"the type of {key}")
        if vtype != ARRAY:
            return Field(self.value(vtype, key), vtype)
        item = self.scalar("I", f"the item type of {key}")
        if item == ARRAY:
            raise InputError(f"{self.path}: {key} is an array of arrays, which llama.cpp refuses")
        count = self.scalar("Q", f"the length of {key}")
        if item in SCALARS:
            width = struct.calcsize(SCALARS[item])
            raw = self.take(self.bounded(count, width, f"items in {key}") * width, key)
            return Field(list(struct.unpack(f"<{count}{SCALARS[item]}", raw)), vtype, item)
        items = [self.value(item, key) for _ in range(self.bounded(count, 8, f"items in {key}"))]
        return Field(items, vtype, item)

    def value(self, vtype: int, key: str) -> Any:
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], key)
        if vtype != STRING:
            raise InputError(
                f"{self.path}: {key} has value type {vtype}, which GGUF does not define"
            )
        raw = self.string(key)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # a token may be bytes that are no text; kept as they are

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.text("a tensor name")
        n_dims = self.scalar("I", f"{name}'s dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise InputError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1 to 4)")
        dims = tuple(self.scalar("Q", f"{name}'s dimensions") for _ in range(n_dims))
        if any(d == 0 for d in dims) or _product(dims) >= 2**62:
            raise InputError(f"{self.path}: tensor {name!r} has dimensions {list(dims)}")
        qtype = self.scalar("I", f"{name}'s type")
        return name, dims, qtype, self.scalar("Q", f"{name}'s offset")


def _product(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n
