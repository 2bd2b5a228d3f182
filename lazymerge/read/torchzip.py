"""Lazy, safe reader of PyTorch `.bin` checkpoints (torch.save's zip format).

`data.pkl` is parsed by a restricted unpickler that can build nothing but tensor
references and plain containers: every opcode is checked against an allowlist before
anything runs, and the only globals it resolves are torch's tensor-rebuild functions and
storage types, mapped to harmless stand-ins. The tensor bytes stay in the zip's stored
(uncompressed) `data/<key>` records, read later through the same memory maps as
safetensors. No `torch.load`, no code from the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lazymerge.errors import InputError
from lazymerge.read.tensorref import TensorRef, itemsize

# torch.save's storage classes (pickled by name) -> safetensors dtype code.
_STORAGE_TYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3", "Float8_e5m2Storage": "F8_E5M2",
}  # fmt: skip
# Opcodes a state dict needs (protocols 2-5). No INST/OBJ/NEWOBJ/EXT*, no buffers.
_OPCODES = frozenset([
    "PROTO", "FRAME", "STOP", "MARK", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
])  # fmt: skip
# A torch.save written before PyTorch 1.6: a bare pickle starting with this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
MAX_PICKLE_BYTES = 100_000_000
CONVERT_HINT = (
    'convert it once with: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN.bin', weights_only=True), 'OUT.safetensors')\""
)
RESAVE = "re-save it from the model (save_pretrained, or torch.save of its state_dict)"


class _Refused(Exception):
    """Raised inside the unpickler; becomes an InputError naming the file."""


class _Ambiguous(_Refused):
    """A pickle that torch.load would read one way and we another; an InputError too."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: object, offset: object, size: object, stride: object, *_: object
) -> _Tensor:
    """Stand-in for torch._utils._rebuild_tensor_v2: records the view, builds nothing."""
    if not (
        isinstance(storage, _Storage)
        and isinstance(offset, int)
        and offset >= 0
        and _dims(size)
        and _dims(stride)
        and len(size) == len(stride)  # type: ignore[arg-type]
    ):
        raise _Refused("malformed tensor record")
    return _Tensor(storage, offset, tuple(size), tuple(stride))  # type: ignore[arg-type]


def _dims(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(x, int) and x >= 0 for x in value)


def _rebuild_parameter(data: object, *_: object) -> object:
    return data  # an nn.Parameter is its tensor for our purposes


_GLOBALS: dict[str, object] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
}


def _set_unique(d: object, key: object, value: object) -> None:
    # A pickle may set one key twice: torch.load keeps the last value without a word.
    if not isinstance(d, dict):
        raise _Refused("SETITEM on something that is not a dict")
    if key in d:
        raise _Ambiguous(f"key {key!r:.80} is set twice in one dict (torch.load keeps the last)")
    d[key] = value


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    if len(items) % 2:
        raise _Refused("odd number of items for a dict")
    return list(zip(items[::2], items[1::2], strict=True))


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (the C one fills dicts out of reach), with the three
    opcodes that fill dicts replaced by ones that refuse a key given twice."""

    # The pure-Python unpickler's working parts, which typeshed leaves out.
    stack: list[Any]
    append: Callable[[Any], None]
    pop_mark: Callable[[], list[Any]]

    def _setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        _set_unique(self.stack[-1], key, value)

    def _setitems(self) -> None:
        for key, value in _pairs(self.pop_mark()):
            _set_unique(self.stack[-1], key, value)

    def _dict(self) -> None:
        d: dict[object, object] = {}
        for key, value in _pairs(self.pop_mark()):
            _set_unique(d, key, value)
        self.append(d)

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = {  # opcode byte -> its loader
        **pickle._Unpickler.dispatch,
        pickle.SETITEM[0]: _setitem,
        pickle.SETITEMS[0]: _setitems,
        pickle.DICT[0]: _dict,
    }

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        target = _GLOBALS.get(f"{module}.{name}")
        if target is None:
            raise _Refused(f"refused pickle global {module}.{name}")
        return target

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel), as torch.save writes it
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and pid[1] in _STORAGE_TYPES.values()
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise _Refused(f"refused persistent id {pid!r:.80}")
        storage = _Storage(pid[2], pid[1], pid[4])
        # torch.load builds a storage once, from its first record: a later one that says
        # another dtype or size would be read as the first by torch and as itself by us.
        first = self.storages.setdefault(storage.key, storage)
        if first != storage:
            raise _Ambiguous(
                f"storage {storage.key} is declared as {first.dtype} x {first.numel} and as "
                f"{storage.dtype} x {storage.numel}"
            )
        return storage


def is_torch_zip(path: Path) -> bool:
    # zipfile.is_zipfile itself raises BadZipFile on some damaged end records.
    try:
        return zipfile.is_zipfile(path)
    except Exception:
        return False


def read_bin(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one `.bin` state dict, in the order the pickle lists them."""
    if not is_torch_zip(path):
        raise InputError(_not_zip_message(path))
    try:
        with zipfile.ZipFile(path) as zf:
            prefix, pkl = _pickle_bytes(path, zf)
            state = _unpickle(path, pkl)
            records = _records(path, zf, prefix)
    except InputError:
        raise
    except Exception as e:  # zipfile raises many kinds on a damaged archive
        raise InputError(
            f"{path}: not a readable PyTorch zip checkpoint ({type(e).__name__}: {e})"
        ) from None
    refs = {name: _ref(path, name, t, records) for name, t in state.items()}
    _check_disjoint(path, state, records)
    return refs


def metadata_digest(path: Path) -> str:
    """sha256 of data.pkl: the `.bin` counterpart of a safetensors header."""
    with zipfile.ZipFile(path) as zf:
        return hashlib.sha256(_pickle_bytes(path, zf)[1]).hexdigest()


def _not_zip_message(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        return f"{path}: legacy (pre-1.6) torch.save format, which cannot be read lazily; {CONVERT_HINT}"
    return f"{path}: not a PyTorch zip checkpoint (and not safetensors)"


def _pickle_bytes(path: Path, zf: zipfile.ZipFile) -> tuple[str, bytes]:
    seen: set[str] = set()
    for name in zf.namelist():
        if name in seen:  # zipfile and torch.load read the last one, others the first
            raise InputError(f"{path}: zip entry {name} appears twice; {RESAVE}")
        seen.add(name)
    names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise InputError(f"{path}: zip has no single <name>/data.pkl; not a torch.save checkpoint")
    info = zf.getinfo(names[0])
    if info.file_size > MAX_PICKLE_BYTES:
        raise InputError(f"{path}: data.pkl is {info.file_size} bytes; refusing to parse")
    prefix = names[0].removesuffix("data.pkl")
    order = (
        zf.read(prefix + "byteorder").decode()
        if prefix + "byteorder" in zf.namelist()
        else "little"
    )
    if order != "little":
        raise InputError(f"{path}: {order}-endian checkpoint; only little-endian is supported")
    return prefix, zf.read(names[0])


def _unpickle(path: Path, data: bytes) -> dict[str, _Tensor]:
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name not in _OPCODES:
                raise _Refused(f"refused pickle opcode {op.name} at byte {pos}")
            # The C unpickler sizes its memo by the largest index: a forged 2**32 would
            # allocate gigabytes. A real pickle memoizes at most once per opcode.
            if op.name.endswith("PUT") and not (isinstance(arg, int) and 0 <= arg <= len(data)):
                raise _Refused(f"refused memo index {arg} at byte {pos}")
        state = _Unpickler(data).load()
    except _Ambiguous as e:
        raise InputError(f"{path}: {e}; {RESAVE}") from None
    except _Refused as e:
        raise InputError(f"{path}: {e}; only plain tensor state dicts are read") from None
    except Exception as e:  # a malformed pickle can raise nearly anything
        raise InputError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path}: not a flat state dict of tensors (name -> tensor)")
    return state


def _records(path: Path, zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[int, int]]:
    """storage key -> (absolute data offset, size) of each stored `data/<key>` record."""
    size = path.stat().st_size
    out = {}
    with open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            key = info.filename.removeprefix(prefix + "data/")
            if info.compress_type != zipfile.ZIP_STORED:
                raise InputError(f"{path}: record {info.filename} is compressed; cannot map it")
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise InputError(f"{path}: zip record {info.filename} has no local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            if f.read(name_len) != info.orig_filename.encode(
                "utf-8" if info.flag_bits & 0x800 else "cp437"
            ):  # the central directory and the record disagree on what this is
                raise InputError(
                    f"{path}: zip record {info.filename}'s local header names another file; "
                    f"{RESAVE}"
                )
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > size:
                raise InputError(f"{path}: record {info.filename} runs past the end of the file")
            out[key] = (start, info.file_size)
    return out


def _ref(path: Path, name: str, t: _Tensor, records: dict[str, tuple[int, int]]) -> TensorRef:
    if t.storage.key not in records:
        raise InputError(f"{path}: tensor {name!r} uses storage {t.storage.key}, which is missing")
    start, record_size = records[t.storage.key]
    width = itemsize(t.storage.dtype)
    if record_size != t.storage.numel * width:  # torch.load refuses it too
        raise InputError(
            f"{path}: tensor {name!r} uses storage {t.storage.key} of {t.storage.numel} "
            f"{t.storage.dtype} ({t.storage.numel * width} bytes) but its record has "
            f"{record_size} bytes; {RESAVE}"
        )
    numel = 1
    for d in t.shape:
        numel *= d
    # Elements the view can reach, whatever its strides (0 for an empty tensor).
    extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True)) if numel else 0
    if (t.offset + extent) * width > record_size:
        raise InputError(
            f"{path}: tensor {name!r} reaches past its storage ({t.storage.key}, {record_size} bytes)"
        )
    strides = None if _contiguous(t.shape, t.stride) else t.stride
    return TensorRef(
        name,
        path,
        t.storage.dtype,
        t.shape,
        start + t.offset * width,
        numel * width,
        strides,
        extent * width,
    )


def _check_disjoint(
    path: Path, state: dict[str, _Tensor], records: dict[str, tuple[int, int]]
) -> None:
    """Two storages may not share bytes in the archive. Views of one storage are fine
    (tied weights: one record, one key); two records over the same bytes are a forgery."""
    users = {t.storage.key: name for name, t in reversed(state.items())}  # first user
    spans = sorted((*records[key], key) for key in users if records[key][1] > 0)
    for (start, size, key), (next_start, _, next_key) in itertools.pairwise(spans):
        if next_start < start + size:
            raise InputError(
                f"{path}: storages {key} and {next_key} (of tensors {users[key]!r} and "
                f"{users[next_key]!r}) overlap in the archive; {RESAVE}"
            )


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True
