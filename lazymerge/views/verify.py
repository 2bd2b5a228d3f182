"""`lazymerge verify OUT`: is this merged model exactly what its manifest says?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lazymerge.errors import OutputError
from lazymerge.read.checkpoint import SAFETENSORS_INDEX
from lazymerge.read.safetensors import read_header
from lazymerge.read.tensorref import TensorRef
from lazymerge.views.report import human_bytes
from lazymerge.write.manifest import MANIFEST, file_sha256

BLOCK = 64 * 2**20  # --deep reads tensors in blocks of about this many bytes


def verify_output(out: Path, deep: bool = False) -> str:
    """One line when sound; OutputError naming the first bad file otherwise."""
    manifest = _load(out / MANIFEST)
    if manifest.get("status") != "complete":
        raise OutputError(
            f"{out / MANIFEST}: the merge is incomplete (status {manifest.get('status')!r}); resume it"
        )
    shards: dict[str, Any] = manifest.get("shards", {})
    if any(name.endswith(".gguf") for name in shards):
        return _verify_gguf(out, manifest, deep)
    index = _load(out / SAFETENSORS_INDEX)
    headers = {name: _check_shard(out / name, rec) for name, rec in shards.items()}
    _check_index(out, index, headers)
    tensors = [ref for refs in headers.values() for ref in refs.values()]
    if deep:
        _check_finite(tensors)
    total = sum(rec["size"] for rec in shards.values())
    return (
        f"{out}: sound - {len(shards)} shard(s), {len(tensors)} tensors, {human_bytes(total)}, "
        f"sha256 verified{', all values finite' if deep else ''}"
    )


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{path}: missing; not a complete lazymerge output") from None
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: not a JSON object")
    return data


def _check_shard(path: Path, rec: dict[str, Any]) -> dict[str, TensorRef]:
    if not path.is_file():
        raise OutputError(f"{path}: missing")
    if path.stat().st_size != rec.get("size"):
        raise OutputError(
            f"{path}: {path.stat().st_size} bytes, the manifest says {rec.get('size')}"
        )
    if file_sha256(path) != rec.get("sha256"):
        raise OutputError(f"{path}: sha256 differs from the manifest; the file is damaged")
    return read_header(path)  # well-formed: offsets inside the file, sizes match dtypes


def _check_index(
    out: Path, index: dict[str, Any], headers: dict[str, dict[str, TensorRef]]
) -> None:
    where = out / SAFETENSORS_INDEX
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise OutputError(f"{where}: no weight_map")
    held = {name: shard for shard, refs in headers.items() for name in refs}
    for name, shard in weight_map.items():
        if held.get(name) != shard:
            raise OutputError(f"{where}: {name} is mapped to {shard}, which does not hold it")
    extra = sorted(set(held) - set(weight_map))
    if extra:
        raise OutputError(
            f"{out / held[extra[0]]}: holds {extra[0]}, which the index does not list"
        )
    total = sum(ref.nbytes for refs in headers.values() for ref in refs.values())
    if index.get("metadata", {}).get("total_size") != total:
        raise OutputError(
            f"{where}: total_size {index.get('metadata', {}).get('total_size')} but the shards hold {total} bytes"
        )


def _check_finite(tensors: list[TensorRef]) -> None:
    import torch  # --deep alone reads values: torch is loaded for it only

    from lazymerge.read.mapped import MappedReader

    with MappedReader() as reader:
        for ref in tensors:
            if not ref.is_float:
                continue
            step = max(1, BLOCK // max(ref.row_nbytes, 1))
            for r0 in range(0, ref.rows, step):
                r1 = min(r0 + step, ref.rows)
                if not bool(torch.isfinite(reader.rows(ref, r0, r1)).all()):
                    raise OutputError(f"{ref.file}: tensor {ref.name} holds NaN/Inf values")
                reader.release(ref, r0 * ref.row_nbytes, r1 * ref.row_nbytes)
            reader.release_touched()


def _verify_gguf(out: Path, manifest: dict[str, Any], deep: bool) -> str:
    """A GGUF output (one file, or its splits): each file's size and sha256 as recorded,
    gguf-py reads it, together they hold exactly the tensors the manifest names; `deep`:
    every value finite, dequantized."""
    from gguf import GGUFReader

    held: set[str] = set()
    shards: dict[str, Any] = manifest.get("shards", {})
    for name, rec in shards.items():
        path = out / name
        if not path.is_file() or path.stat().st_size != rec.get("size"):
            raise OutputError(
                f"{path}: missing or not the {rec.get('size')} bytes the manifest says"
            )
        if file_sha256(path) != rec.get("sha256"):
            raise OutputError(f"{path}: sha256 differs from the manifest; the file is damaged")
        try:
            reader = GGUFReader(path)
        except (ValueError, OSError) as e:
            raise OutputError(f"{path}: not a readable GGUF ({e})") from None
        held |= {t.name for t in reader.tensors}
        if deep:
            _gguf_finite(path, reader)
    want = {d["gguf"]["name"] for d in manifest.get("tensors", {}).values() if "gguf" in d}
    if held != want:
        odd = sorted(held ^ want)[0]
        raise OutputError(f"{out}: tensor {odd} is in one of the GGUF and its manifest only")
    total = sum(rec["size"] for rec in shards.values())
    files = "1 GGUF file" if len(shards) == 1 else f"{len(shards)} GGUF split files"
    return (
        f"{out}: sound - {files}, {len(held)} tensors, {human_bytes(total)}, "
        f"sha256 verified{', all values finite' if deep else ''}"
    )


def _gguf_finite(path: Path, reader: Any) -> None:
    import numpy as np
    from gguf import quants

    for t in reader.tensors:
        data = np.asarray(t.data)
        rows = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
        step = max(1, BLOCK // max(rows[0].nbytes, 1))
        for r0 in range(0, rows.shape[0], step):
            values = quants.dequantize(rows[r0 : r0 + step], t.tensor_type)
            if not np.isfinite(values).all():
                raise OutputError(f"{path}: tensor {t.name} holds NaN/Inf values")
