"""Hub ids resolved through the local Hugging Face cache (lazymerge/read/hub.py).

The cache is built here in huggingface_hub's layout (models--owner--name/refs, snapshots of
symlinks into blobs/) and cross-checked with huggingface_hub's own scanner, so the fixture is
the real layout, not only the one our code expects. No test touches the network: downloads
go to a fake Hub that writes the same layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined,unused-ignore]
from safetensors.numpy import save

from lazymerge.errors import InputError
from lazymerge.read import hub
from lazymerge.read.checkpoint import CheckpointIndex

REPO = "owner/tiny"
MAIN = "a" * 40
OLD = "b" * 40
HUB_VARS = (
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
)  # fmt: skip


def weights(value: float) -> bytes:
    return save({"w": np.full((2, 2), value, np.float32)})


def sharded(value: float) -> dict[str, bytes]:
    """A two-shard safetensors model, as a repo's files."""
    shards = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"}
    index = {"metadata": {}, "weight_map": {name: shard for shard, name in shards.items()}}
    files = {
        shard: save({name: np.full((2,), value, np.float32)}) for shard, name in shards.items()
    }
    return files | {
        "model.safetensors.index.json": json.dumps(index).encode(),
        "config.json": b"{}",
    }


def put(cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None) -> Path:
    """Files into `cache` as huggingface_hub stores them: content in blobs/<hash>, the
    snapshot a tree of relative symlinks to them, `ref` a file holding the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of this machine's leaks in; nothing reaches the network even if asked."""
    for name in HUB_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with REPO: main (safetensors and tokenizer) and tag v1 at an older commit."""
    cache = tmp_path / "hub"
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": weights(1.0)}
    put(cache, REPO, MAIN, files, "main")
    put(cache, REPO, OLD, {"config.json": b"{}", "model.safetensors": weights(0.0)}, "v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def snap(cache: Path, commit: str, repo: str = REPO) -> Path:
    return (cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit).resolve()


# The fixture is huggingface_hub's layout


def test_huggingface_hub_reads_the_fixture_as_its_own_cache(cache: Path) -> None:
    info = huggingface_hub.scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {MAIN: {"main"}, OLD: {"v1"}}
    found = huggingface_hub.try_to_load_from_cache(REPO, "tokenizer.json", cache_dir=cache)
    assert found == str(snap(cache, MAIN) / "tokenizer.json")
    old = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache, revision="v1")
    assert old == str(snap(cache, OLD) / "config.json")


def load_constants(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    """huggingface_hub's constants.py run afresh under `env`: its own reading of the
    variables (the imported copy read them once, at import)."""
    for name in HUB_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    origin = huggingface_hub.constants.__file__
    spec = importlib.util.spec_from_file_location("fresh_hf_constants", origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HF_HOME": "/h"},
        {"HF_HOME": "~/h", "HF_HUB_CACHE": "$HOME/c"},
        {"XDG_CACHE_HOME": "/x"},
        {"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/h"},
        {"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HUB_CACHE": "/new"},
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "true"},
        {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "yes"},
        {"TRANSFORMERS_OFFLINE": "ON"},
        {"HF_HUB_OFFLINE": "no"},
    ],
)
def test_cache_and_offline_follow_huggingface_hubs_rule(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = load_constants(monkeypatch, env)
    assert hub.hub_cache() == Path(theirs.HF_HUB_CACHE)
    assert (hub.offline_reason() is not None) == theirs.HF_HUB_OFFLINE


# Offline resolution


def test_an_id_resolves_to_mains_snapshot(cache: Path) -> None:
    found = hub.resolve(REPO, "models[0]")
    assert found == snap(cache, MAIN)
    assert CheckpointIndex.open(found)["w"].shape == (2, 2)  # the reader follows the links


def test_hf_home_places_the_cache_when_hf_hub_cache_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tmp_path / "home" / "hub", REPO, MAIN, {"model.safetensors": weights(1.0)}, "main")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.resolve(REPO, "base") == snap(tmp_path / "home" / "hub", MAIN)


@pytest.mark.parametrize(("revision", "commit"), [("v1", OLD), (OLD, OLD), ("main", MAIN)])
def test_a_revision_picks_its_snapshot(cache: Path, revision: str, commit: str) -> None:
    assert hub.resolve(f"{REPO}@{revision}", "models[0]") == snap(cache, commit)


def test_a_pr_ref_with_slashes_resolves(cache: Path) -> None:
    put(cache, REPO, "c" * 40, {"model.safetensors": weights(2.0)}, "refs/pr/1")
    assert hub.resolve(f"{REPO}@refs/pr/1", "base") == snap(cache, "c" * 40)


def test_a_bare_name_is_an_id(cache: Path) -> None:
    put(cache, "gpt2", MAIN, {"model.safetensors": weights(1.0)}, "main")
    assert hub.resolve("gpt2", "base") == snap(cache, MAIN, "gpt2")


def test_a_local_directory_is_itself(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "owner" / "tiny"  # shaped like an id: the path still wins
    local.mkdir(parents=True)
    assert hub.resolve(str(local), "models[0]") == local
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("owner/tiny", "models[0]") == Path("owner/tiny")


def test_an_uncached_id_is_one_line_naming_it(cache: Path) -> None:
    with pytest.raises(InputError) as e:
        hub.resolve("mistralai/Mistral-7B-v0.1", "models[1]")
    assert str(e.value) == (
        f"models[1]: mistralai/Mistral-7B-v0.1 is not in the Hugging Face cache ({cache}) and "
        "cannot be downloaded (offline: HF_HUB_OFFLINE=1); download it with "
        "`hf download mistralai/Mistral-7B-v0.1` or give a local path"
    )


@pytest.mark.parametrize("revision", ["v9", "c" * 40])
def test_an_uncached_revision_is_one_line_naming_it(cache: Path, revision: str) -> None:
    with pytest.raises(InputError, match=rf"^base: {REPO}@{revision} is not in the .*") as e:
        hub.resolve(f"{REPO}@{revision}", "base")
    assert str(e.value).endswith(f"`hf download {REPO} --revision {revision}` or give a local path")


def test_transformers_offline_counts_too(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(InputError, match=r"\(offline: TRANSFORMERS_OFFLINE=1\)"):
        hub.resolve("someone/else", "base")


def test_a_snapshot_missing_a_listed_shard_is_incomplete(cache: Path) -> None:
    files = sharded(1.0)
    del files["model-00002-of-00002.safetensors"]
    snapshot = put(cache, "owner/big", MAIN, files, "main")
    with pytest.raises(InputError) as e:
        hub.resolve("owner/big", "models[2]")
    assert str(e.value) == (
        f"models[2]: owner/big's cached snapshot ({snapshot.resolve()}) lacks "
        "model-00002-of-00002.safetensors and cannot be downloaded (offline: HF_HUB_OFFLINE=1); "
        "download it with `hf download owner/big` or give a local path"
    )


def test_a_complete_sharded_snapshot_resolves(cache: Path) -> None:
    put(cache, "owner/big", MAIN, sharded(1.0), "main")
    found = hub.resolve("owner/big", "base")
    assert len(CheckpointIndex.open(found)) == 2


def test_a_blob_deleted_under_its_link_is_missing(cache: Path) -> None:
    snapshot = put(cache, "owner/big", MAIN, sharded(1.0), "main")
    (snapshot / "model-00001-of-00002.safetensors").resolve().unlink()
    with pytest.raises(InputError, match=r"lacks model-00001-of-00002\.safetensors and"):
        hub.resolve("owner/big", "base")


def test_a_snapshot_with_a_config_alone_has_no_weights(cache: Path) -> None:
    """What AutoConfig.from_pretrained leaves in the cache."""
    put(cache, "owner/cfg", MAIN, {"config.json": b"{}"}, "main")
    with pytest.raises(InputError, match=r"^base: owner/cfg's cached snapshot .* lacks weights \("):
        hub.resolve("owner/cfg", "base")


def test_bin_and_adapter_snapshots_are_complete(cache: Path) -> None:
    put(cache, "owner/old", MAIN, {"pytorch_model.bin": b"PK"}, "main")
    put(cache, "owner/lora", MAIN, {"adapter_model.safetensors": weights(1.0)}, "main")
    assert hub.resolve("owner/old", "base") == snap(cache, MAIN, "owner/old")
    assert hub.resolve("owner/lora", "loras[0]") == snap(cache, MAIN, "owner/lora")


@pytest.mark.parametrize(
    "ref",
    ["", "./no/such/dir", "/no/such/dir", "a/b/c", "owner/na--me", "owner/tiny@", "x@a@b",
     "owner/tiny@../../etc", "owner/tiny@/abs", "has space/x"],
)  # fmt: skip
def test_neither_a_directory_nor_an_id(cache: Path, ref: str) -> None:
    with pytest.raises(InputError) as e:
        hub.resolve(ref, "models[3]")
    assert str(e.value) == (
        f"models[3]: {ref!r} is neither a directory nor a Hub id (owner/name or "
        "owner/name@revision)"
    )


# Downloads: which files, from a fake Hub


def test_safetensors_are_chosen_over_bin_and_subfolders() -> None:
    listing = [
        ".gitattributes", "README.md", "config.json", "generation_config.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "consolidated.safetensors",
        "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
        "original/model.safetensors", "onnx/model.onnx", "params.json",
    ]  # fmt: skip
    assert hub.needed_files(listing) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.model", "special_tokens_map.json", "model.safetensors.index.json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("listing", "weights"),
    [
        (["model.safetensors", "pytorch_model.bin"], ["model.safetensors"]),
        (["pytorch_model.bin.index.json", "pytorch_model-1.bin"], ["pytorch_model.bin.index.json"]),
        (["pytorch_model.bin", "model.onnx"], ["pytorch_model.bin"]),
        (["adapter_model.safetensors", "adapter_model.bin"], ["adapter_model.safetensors"]),
        (["adapter_model.bin"], ["adapter_model.bin"]),
        # safetensors the readers do not open: still never the .bin
        (["consolidated.safetensors", "pytorch_model.bin"], []),
        (["README.md", "config.json"], []),
    ],
)
def test_weights_in_one_format(listing: list[str], weights: list[str]) -> None:
    needed = hub.needed_files(["adapter_config.json", *listing])
    assert needed == (["adapter_config.json", *weights] if weights else [])


class FakeHub:
    """list_repo_files and snapshot_download over `files`, writing the cache's layout;
    local look-ups go to the real snapshot_download."""

    def __init__(self, repo: str, files: dict[str, bytes], commit: str = MAIN) -> None:
        self.repo, self.files, self.commit = repo, files, commit
        self.asked: list[list[str]] = []
        self.real = huggingface_hub.snapshot_download

    def list_repo_files(self, repo_id: str, *, revision: str | None = None) -> list[str]:
        assert (repo_id, revision) == (self.repo, None)
        return sorted(self.files)

    def snapshot_download(self, repo_id: str, **kw: Any) -> str:
        if kw.get("local_files_only"):
            return str(self.real(repo_id, **kw))
        patterns = kw["allow_patterns"]
        self.asked.append(patterns)
        chosen = {
            n: self.files[n] for n in filter_repo_objects(self.files, allow_patterns=patterns)
        }
        revision = kw.get("revision")
        ref = None if revision == self.commit else (revision or "main")
        return str(put(Path(kw["cache_dir"]), repo_id, self.commit, chosen, ref).resolve())


@pytest.fixture
def online(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE unset for our code; huggingface_hub itself stays offline, so a call
    that escapes the fake fails at once instead of reaching the network."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return cache


def fake(monkeypatch: pytest.MonkeyPatch, repo: str, files: dict[str, bytes]) -> FakeHub:
    fake = FakeHub(repo, files)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_a_download_fetches_only_what_a_merge_reads_never_bin(
    online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sharded(1.0) | {
        "pytorch_model.bin.index.json": b"{}", "pytorch_model-00001-of-00001.bin": b"PK",
        "consolidated.safetensors": weights(3.0), "tokenizer.json": b"{}", "README.md": b"",
    }  # fmt: skip
    hubfake = fake(monkeypatch, "owner/big", files)
    found = hub.resolve("owner/big", "base")
    assert hubfake.asked == [
        ["config.json", "tokenizer.json", "model.safetensors.index.json"],
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    ]
    assert sorted(p.name for p in found.iterdir()) == sorted([*hubfake.asked[0], *hubfake.asked[1]])
    assert found == snap(online, MAIN, "owner/big")
    assert len(CheckpointIndex.open(found)) == 2
    assert hub.resolve("owner/big", "base") == found  # now cached: the Hub is not asked again
    assert len(hubfake.asked) == 2


def test_a_cached_complete_snapshot_does_not_ask_the_hub(
    online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hubfake = fake(monkeypatch, REPO, {})
    assert hub.resolve(REPO, "base") == snap(online, MAIN)
    assert hubfake.asked == []


def test_an_incomplete_snapshot_fetches_the_missing_shard(
    online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sharded(1.0)
    cached = {n: d for n, d in files.items() if n != "model-00002-of-00002.safetensors"}
    put(online, "owner/big", MAIN, cached, "main")
    hubfake = fake(monkeypatch, "owner/big", files)
    found = hub.resolve("owner/big", "base")
    assert hubfake.asked[-1] == ["model-00002-of-00002.safetensors"]
    assert len(CheckpointIndex.open(found)) == 2


def test_an_index_naming_shards_the_repo_lacks(
    online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sharded(1.0)
    del files["model-00002-of-00002.safetensors"]
    fake(monkeypatch, "owner/big", files)
    with pytest.raises(InputError) as e:
        hub.resolve("owner/big", "base")
    assert str(e.value) == (
        f"base: owner/big at commit {MAIN} lists model-00002-of-00002.safetensors in its "
        "index, but the repository does not have them; give a local path"
    )


def test_a_repo_without_readable_weights_is_not_downloaded(
    online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hubfake = fake(monkeypatch, "owner/gguf", {"config.json": b"{}", "model.Q4_K_M.gguf": b""})
    with pytest.raises(InputError, match=r"^base: owner/gguf has no weights \(model\.safetensors"):
        hub.resolve("owner/gguf", "base")
    assert hubfake.asked == []


def test_huggingface_hubs_own_offline_mode_is_one_line(online: Path) -> None:
    """Our variables say online, but huggingface_hub was imported offline: its real
    list_repo_files refuses, without a network, and that becomes one line."""
    with pytest.raises(InputError) as e:
        hub.resolve("someone/else", "models[0]")
    assert str(e.value) == (
        f"models[0]: someone/else is not in the Hugging Face cache ({online}) and cannot be "
        "downloaded (offline: huggingface_hub was imported with HF_HUB_OFFLINE set); download "
        "it with `hf download someone/else` or give a local path"
    )


def http_error(name: str) -> Exception:
    import httpx2

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/x"))
    cls = getattr(huggingface_hub.errors, name)
    error: Exception = cls(
        "404 Client Error.\n\nRepository Not Found for url: ...", response=response
    )
    return error


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (lambda: http_error("RepositoryNotFoundError"), "no such repository on the Hub, or a private one"),
        (lambda: http_error("GatedRepoError"), "gated: accept its terms on https://huggingface.co/owner/x"),
        (lambda: http_error("RevisionNotFoundError"), "the Hub has no revision main"),
        (lambda: ConnectionError("Name or service not known\nmore"), "the Hub cannot be reached: ConnectionError: Name or service not known"),
        (lambda: RuntimeError("odd\ntrace"), "RuntimeError: odd"),
    ],
)  # fmt: skip
def test_hub_failures_are_one_line(
    online: Path, monkeypatch: pytest.MonkeyPatch, error: Any, why: str
) -> None:
    def refuse(*args: object, **kw: object) -> list[str]:
        raise error()

    monkeypatch.setattr(huggingface_hub, "list_repo_files", refuse)
    with pytest.raises(InputError) as e:
        hub.resolve("owner/x", "models[4]")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("models[4]: owner/x is not in the Hugging Face cache")
    assert f"cannot be downloaded ({why}" in message


def test_a_cached_listing_naming_skipped_bin_files_does_not_refuse_the_snapshot(
    cache: Path,
) -> None:
    """huggingface_hub >= 2 caches the repo's file listing (trees/<commit>.json) when it
    downloads, and its local look-up then refuses a snapshot that lacks any listed file:
    the .bin weights a merge never fetches too. Our check of what a merge reads decides."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    storage = cache / f"models--{REPO.replace('/', '--')}"
    listing = {
        "config.json": 2,
        "tokenizer.json": 2,
        "model.safetensors": 9,
        "pytorch_model.bin": 9,
    }
    entries = {n: tree_cache.TreeCacheEntry(size=s, blob_id="0" * 40) for n, s in listing.items()}
    tree_cache.write_tree_cache(str(storage), MAIN, entries)
    with pytest.raises(huggingface_hub.errors.IncompleteSnapshotError, match=r"pytorch_model\.bin"):
        huggingface_hub.snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert hub.resolve(REPO, "base") == snap(cache, MAIN)
