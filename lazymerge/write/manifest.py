"""lazymerge.json's content: what was merged from what, and the record a resume trusts
(output.py writes it).

It is written when a merge starts (recipe hash, input fingerprints, no shards), rewritten
as each shard is completed (name, size, sha256), and a last time, `complete`, just before
the index. `--resume` keeps a shard only if its final file still has the size and sha256
recorded here, and only if the recipe, the inputs and lazymerge's version are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lazymerge import __version__
from lazymerge.errors import OutputError
from lazymerge.plan.model import MergePlan
from lazymerge.read.checkpoint import SAFETENSORS_INDEX, header_digest
from lazymerge.write.safetensors import ShardResult

MANIFEST = "lazymerge.json"


def recipe_hash(plan: MergePlan) -> str:
    """sha256 of the recipe as canonical JSON (paths absolute, output settings included)."""
    canonical = json.dumps(plan.recipe.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime and header sha256: cheap (no data read) and enough to notice a file
    that was replaced or rewritten since; a full data hash would cost a second pass."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": header_digest(path)}


class Record:
    """A merge's manifest. Its fixed part (recipe hash, input fingerprints, per-tensor
    decisions) is taken once, when the merge starts: those are the inputs this run read."""

    def __init__(self, plan: MergePlan) -> None:
        self.fixed: dict[str, Any] = {
            "lazymerge_version": __version__,
            "recipe_sha256": recipe_hash(plan),
            "recipe": plan.recipe.to_dict(),
            "inputs": {str(p): fingerprint(p) for p in plan.input_files()},
            "tensors": {t.name: t.describe() for t in plan.tensors},
        }

    def data(
        self, shards: Sequence[ShardResult], *, complete: bool, **extra: Any
    ) -> dict[str, Any]:
        """The manifest as written now: status, the fixed part, the shards done so far."""
        return {
            "status": "complete" if complete else "incomplete",
            **self.fixed,
            "shards": {s.name: {"size": s.size, "sha256": s.sha256} for s in shards},
            **extra,
        }


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def completed_shards(out: Path, plan: MergePlan, record: Record) -> dict[str, ShardResult]:
    """The shards an earlier attempt finished and that are still intact on disk.

    Refuses (OutputError) when the recipe, an input or lazymerge changed since then.
    """
    path = out / MANIFEST
    if not path.is_file():
        return {}  # the first attempt died before its first record: start afresh
    old = _read(path)
    recorded = old["shards"]
    _check_same(path, old, record)
    planned = {s.name for s in plan.shards}
    kept = {}
    for name, rec in recorded.items():
        f = out / name
        if (
            name in planned
            and f.is_file()
            and f.stat().st_size == rec.get("size")
            and file_sha256(f) == rec.get("sha256")
        ):
            kept[name] = ShardResult(name, rec["size"], rec["sha256"])
    return kept


def is_complete(out: Path, plan: MergePlan, record: Record) -> bool:
    """Whether `out` holds this very merge, finished (see finished_shards)."""
    return finished_shards(out, plan, record) is not None


def finished_shards(out: Path, plan: MergePlan, record: Record) -> list[ShardResult] | None:
    """The shards of `out`, as its manifest records them, when it holds this very merge,
    finished: index present, manifest complete and made from the same recipe, inputs and
    lazymerge, every shard there at its size; else None.

    Cheap (no shard is read); `lazymerge verify` rehashes. Refuses (OutputError) when a
    finished merge there came from another recipe or other inputs.
    """
    path = out / MANIFEST
    if not (path.is_file() and (out / SAFETENSORS_INDEX).is_file()):
        return None
    old = _read(path)
    if old.get("status") != "complete":
        return None
    _check_same(path, old, record)
    recorded = old["shards"]
    intact = all(
        (out / s.name).is_file()
        and s.name in recorded
        and (out / s.name).stat().st_size == recorded[s.name].get("size")
        for s in plan.shards
    )
    if not intact:
        return None
    return [
        ShardResult(s.name, recorded[s.name]["size"], recorded[s.name].get("sha256", ""))
        for s in plan.shards
    ]


def _read(path: Path) -> dict[str, Any]:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict) or not isinstance(old["shards"], dict):
            raise TypeError("not a lazymerge manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{path}: unreadable ({e}); cannot resume, use --overwrite") from None
    return old


def _check_same(path: Path, old: dict[str, Any], record: Record) -> None:
    why = "; cannot resume: start over with --overwrite"
    if old.get("lazymerge_version") != __version__:
        raise OutputError(
            f"{path}: written by lazymerge {old.get('lazymerge_version')}, this is {__version__}{why}"
        )
    if old.get("recipe_sha256") != record.fixed["recipe_sha256"]:
        raise OutputError(f"{path}: the recipe changed since the first attempt{why}")
    now: dict[str, Any] = record.fixed["inputs"]
    for name, fp in now.items():
        if old.get("inputs", {}).get(name) != fp:
            raise OutputError(f"{path}: input {name} changed since the first attempt{why}")
    if set(old.get("inputs", {})) != set(now):
        raise OutputError(f"{path}: the set of input files changed since the first attempt{why}")
