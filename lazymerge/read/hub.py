"""Hub ids in recipes -> model directories in the local Hugging Face cache.

mergekit configs on model cards name models by Hub id (`owner/name`, `owner/name@revision`).
`resolve` turns one such name into a directory the checkpoint reader opens: an existing path
as it is, else the cache's snapshot, found by huggingface_hub itself (its layout; HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE as it defines them). A snapshot that lacks what a merge reads
is completed from the Hub when the network is allowed, downloading only those files.

huggingface_hub is imported inside the functions, so `lazymerge --help` does not pay for it.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lazymerge.errors import InputError
from lazymerge.read.checkpoint import BIN_FILE, BIN_INDEX, SAFETENSORS_INDEX, SINGLE_FILE
from lazymerge.read.config import CONFIG

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
# Besides weights, a merge reads the config it plans with, an adapter's config, and the
# files the output copies from the base or the tokenizer source (write/output.py AUX_FILES).
METADATA = (
    CONFIG, ADAPTER_CONFIG, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# Weights in the order the readers prefer them (checkpoint.py: an index over a single file,
# safetensors over .bin).
READ_ORDER = (SAFETENSORS_INDEX, SINGLE_FILE, ADAPTER_SAFETENSORS, BIN_INDEX, BIN_FILE, ADAPTER_BIN)
NO_WEIGHTS = f"weights ({', '.join(READ_ORDER)})"
TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES
# Branch, tag or commit; no `..` (a revision becomes a path under refs/ in the cache).
REVISION = re.compile(r"(?!.*\.\.)[\w.\-]+(/[\w.\-]+)*")

T = TypeVar("T")


@dataclass(frozen=True)
class HubRef:
    """One Hub id as a recipe wrote it, with the recipe entry that wrote it (for messages)."""

    repo_id: str
    revision: str | None
    where: str

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def cannot(self, state: str, why: str) -> str:
        """The one line for a model that is not (all) here and cannot be fetched."""
        rev = f" --revision {self.revision}" if self.revision else ""
        return (
            f"{self.where}: {self.label}{state} and cannot be downloaded ({why}); download it "
            f"with `hf download {self.repo_id}{rev}` or give a local path"
        )


def resolve(ref: str, where: str) -> Path:
    """The model or adapter directory a recipe's `ref` names.

    Args:
        ref: an existing path (a relative one already joined to the recipe's directory), or
            a Hub id `owner/name` / `name`, optionally `@revision` (branch, tag or commit).
        where: the recipe entry, e.g. `models[1]`, which every error starts with.

    Returns:
        `ref` itself when it exists, else the snapshot directory in the Hugging Face cache,
        downloaded (only the files a merge reads) when absent or incomplete and not offline.

    Raises:
        InputError: one line naming `where` and the id, with the reason and the fix.
    """
    if ref and Path(ref).exists():
        return Path(ref)
    hub = parse_ref(ref, where)
    cache = hub_cache()
    snapshot = cached_snapshot(hub, cache)
    lacking = missing_files(snapshot) if snapshot is not None else []
    if snapshot is not None and not lacking:
        return snapshot
    state = (
        f" is not in the Hugging Face cache ({cache})"
        if snapshot is None
        else f"'s cached snapshot ({snapshot}) lacks {_few(lacking)}"
    )
    why = offline_reason()
    if why is not None:
        raise InputError(hub.cannot(state, why))
    return download(hub, cache, state)


def parse_ref(ref: str, where: str) -> HubRef:
    """`owner/name[@revision]` (mergekit's syntax: one `@` at most), checked by
    huggingface_hub's own rule for ids, so a mistyped path is not sent to the Hub."""
    # Public, but re-exported lazily, which a strict type check does not see.
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined,unused-ignore]

    repo_id, at, revision = ref.partition("@")
    try:
        validate_repo_id(repo_id)
        ok = not at or REVISION.fullmatch(revision) is not None
    except ValueError:  # HFValidationError
        ok = False
    if not ok:
        raise InputError(
            f"{where}: {ref!r} is neither a directory nor a Hub id (owner/name or "
            "owner/name@revision)"
        )
    return HubRef(repo_id, revision or None, where)


def hub_cache() -> Path:
    """The hub cache by huggingface_hub's rule (its constants.py): HF_HUB_CACHE, else the
    legacy HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, HF_HOME defaulting to
    $XDG_CACHE_HOME/huggingface, then ~/.cache/huggingface. Read when called, because
    huggingface_hub reads them once, at its import, which a later setting would miss."""
    xdg = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = _expand(os.getenv("HF_HOME", os.path.join(xdg, "huggingface")))
    legacy = os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return Path(_expand(os.getenv("HF_HUB_CACHE", legacy)))


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def offline_reason() -> str | None:
    """Why the Hub may not be asked, by huggingface_hub's rule (HF_HUB_OFFLINE, else
    TRANSFORMERS_OFFLINE, true as 1/on/yes/true); None when it may be."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:  # a set HF_HUB_OFFLINE=0 hides TRANSFORMERS_OFFLINE there too
            return f"offline: {name}={value}" if value.upper() in TRUE else None
    return None


def cached_snapshot(hub: HubRef, cache: Path) -> Path | None:
    """The snapshot `hub` names in the cache, found as huggingface_hub finds it
    (refs/<branch or tag> -> commit, or the commit itself); None when there is none."""
    import huggingface_hub

    try:
        found = huggingface_hub.snapshot_download(
            hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=True
        )
    except (OSError, ValueError) as e:
        # Recent versions refuse a snapshot that their cached file listing shows partial,
        # counting every file, the .bin weights skipped on purpose too: what a merge reads
        # decides here (missing_files).
        partial = getattr(e, "snapshot_path", None)
        return Path(partial) if isinstance(partial, str) else None
    return Path(found)


def missing_files(snapshot: Path) -> list[str]:
    """What the readers would miss in `snapshot`: the shards its index lists but it lacks
    (an interrupted download), or all weights (a cache AutoConfig filled with config.json)."""
    for name in READ_ORDER:
        if (snapshot / name).is_file():
            if not name.endswith(".index.json"):
                return []
            return [s for s in shard_names(snapshot / name) if not (snapshot / s).is_file()]
    return [NO_WEIGHTS]


def shard_names(index: Path) -> list[str]:
    """The shard files an index lists. A malformed index or entry is left to the checkpoint
    reader, which names the problem; here it would only be one more file to fetch."""
    try:
        shards = json.loads(index.read_bytes())["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted({s for s in shards if isinstance(s, str) and s and Path(s).name == s})


def needed_files(listing: Iterable[str]) -> list[str]:
    """The files of a repo a merge reads: metadata, and weights in one format, safetensors
    whenever the repo has any (never its .bin then). An index's shards are known only once
    it is read (`download`). Empty when the repo has no weights the readers open."""
    # The readers open the directory itself, not subfolders (onnx/, original/).
    top = {name for name in listing if "/" not in name}
    if any(name.endswith(".safetensors") for name in top):
        kinds = ((SAFETENSORS_INDEX, SINGLE_FILE), (ADAPTER_SAFETENSORS,))
    else:
        kinds = ((BIN_INDEX, BIN_FILE), (ADAPTER_BIN,))
    weights = [next(name for name in kind if name in top) for kind in kinds if top & set(kind)]
    return [name for name in METADATA if name in top] + weights if weights else []


def download(hub: HubRef, cache: Path, state: str) -> Path:
    """Fetch what `needed_files` picks from the repo's listing, then the shards the fetched
    index lists, into the cache; `state` says what the cache lacked, for the error."""
    import huggingface_hub

    listing = _asking(
        hub,
        state,
        functools.partial(huggingface_hub.list_repo_files, hub.repo_id, revision=hub.revision),
    )
    names = needed_files(listing)
    if not names:
        raise InputError(
            f"{hub.where}: {hub.label} has no {NO_WEIGHTS} on the Hub; give a local path"
        )
    snapshot = _asking(hub, state, functools.partial(_fetch, hub, cache, names, hub.revision))
    lacking = missing_files(snapshot)
    if lacking:  # pinned to the commit just fetched, so the shards match its index
        fetch = functools.partial(_fetch, hub, cache, lacking, snapshot.name)
        snapshot = _asking(hub, state, fetch)
        lacking = missing_files(snapshot)
    if lacking:
        raise InputError(
            f"{hub.where}: {hub.label} at commit {snapshot.name} lists {_few(lacking)} in its "
            "index, but the repository does not have them; give a local path"
        )
    return snapshot


def _fetch(hub: HubRef, cache: Path, names: list[str], revision: str | None) -> Path:
    import huggingface_hub

    # Exact names as patterns (fnmatch): escaped, so a `[` in a name matches itself.
    patterns = [glob.escape(name) for name in names]
    folder = huggingface_hub.snapshot_download(
        hub.repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns
    )
    return Path(folder)


def _asking(hub: HubRef, state: str, call: Callable[[], T]) -> T:
    """One call to the Hub; any failure (offline, no network, no such repository or
    revision, gated) becomes the one line `hub.cannot` writes."""
    try:
        return call()
    except Exception as e:  # the Hub's failures span httpx, OSError and its own classes
        raise InputError(hub.cannot(state, _why(e, hub))) from e


def _why(e: Exception, hub: HubRef) -> str:
    """A Hub failure in a few words. Classes are matched by name, not imported: they moved
    from huggingface_hub.utils to huggingface_hub.errors between versions."""
    names = {c.__name__ for c in type(e).__mro__}
    lines = str(e).strip().splitlines()
    said = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    if "OfflineModeIsEnabled" in names:
        return "offline: huggingface_hub was imported with HF_HUB_OFFLINE set"
    if "GatedRepoError" in names:
        return f"gated: accept its terms on https://huggingface.co/{hub.repo_id} and log in"
    if "RevisionNotFoundError" in names:
        return f"the Hub has no revision {hub.revision or 'main'}"
    if "RepositoryNotFoundError" in names:
        return "no such repository on the Hub, or a private one: check the id or log in"
    if names & {"ConnectionError", "ConnectError", "TimeoutException", "Timeout"}:
        return f"the Hub cannot be reached: {said}"
    return said


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more
