"""N-model merges end to end, beyond the comparison with mergekit: random masks that
depend only on (seed, tensor, model, element), Hub ids from the local cache, LoRAs on a
model of a task-arithmetic merge, and bad input refused in one line before anything is
written."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import error_of, load_merged, make_llama, peft_merge, run_cli
from mergekit_ref import Family, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("nmodel"), torch.float16, seed=5)


def dare(family: Family, seed: int = 1, density: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {
        "method": "dare_ties",
        "base": str(family.base),
        "models": [
            {"model": str(p), "parameters": {"weight": w, "density": density}}
            for p, w in zip(family.finetunes, (0.5, 0.3, 0.2), strict=True)
        ],
        "seed": seed,
        **extra,
    }


def merge(recipe: dict[str, Any], tmp: Path, name: str, *flags: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp / name
    assert run_cli("merge", path, "-o", out, "-q", *flags) == 0
    return out


def shard_hashes(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.glob("*.safetensors"))
    }


def test_dare_bytes_depend_on_the_seed_only(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed: the same bytes whatever the block size (--max-memory), the torch
    threads, the shard split, and run after run; another seed: other masks."""
    first = shard_hashes(merge(dare(family), tmp_path, "a"))
    assert shard_hashes(merge(dare(family), tmp_path, "again")) == first
    assert (
        shard_hashes(merge(dare(family), tmp_path, "tiny-blocks", "--max-memory", "1KiB")) == first
    )
    monkeypatch.setattr("lazymerge.run.process.compute_threads", lambda *_: 2)
    assert shard_hashes(merge(dare(family), tmp_path, "threads")) == first
    sharded = load_merged(merge(dare(family), tmp_path, "sharded", "--shard-size", "20KB"))
    assert {k: v.tolist() for k, v in sharded.items()} == {
        k: v.tolist() for k, v in load_merged(tmp_path / "a").items()
    }
    assert shard_hashes(merge(dare(family, seed=2), tmp_path, "b")) != first


def test_dare_keeps_about_density_of_each_task_vector(family: Family, tmp_path: Path) -> None:
    """dare_linear with one model, weight 1: the output's task vector is the model's, each
    element kept (and rescaled by the tensor's L1 ratio) or dropped; the kept share is the
    density."""
    recipe = {
        "method": "dare_linear",
        "base": str(family.base),
        "models": [
            {"model": str(family.finetunes[0]), "parameters": {"weight": 1.0, "density": 0.5}}
        ],
        "compute": "float32",
        "output": {"dtype": "float32"},
    }
    got = load_merged(merge(recipe, tmp_path, "dl"))
    base, ft = load_merged(family.base), load_merged(family.finetunes[0])
    kept = total = 0
    for name, out in got.items():
        delta = ft[name].float() - base[name].float()
        mine = out - base[name].float()
        keep = mine != 0
        live = delta != 0
        kept, total = kept + int((keep & live).sum()), total + int(live.sum())
        assert not bool((keep & ~live).any()), name  # nothing appears where there was no delta
        factor = delta.abs().sum(dtype=torch.float64) / delta[keep].abs().sum(dtype=torch.float64)
        # fp32 steps (delta * factor, base + it): a few ulps of the larger operand
        err = (mine[keep] - delta[keep] * float(factor)).abs()
        scale = torch.maximum(out[keep].abs(), base[name].float()[keep].abs())
        assert bool((err <= 4 * torch.finfo(torch.float32).eps * scale).all()), name
    assert abs(kept / total - 0.5) < 0.02


def hub_cache(root: Path, repo: str, model: Path) -> Path:
    """`model` as huggingface_hub's cache holds a download of `repo` (blobs, refs,
    snapshots)."""
    commit = "0" * 39 + "1"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in model.iterdir():
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_mergekit_config_with_hub_ids_from_the_cache(
    family: Family,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "hub"
    hub_cache(cache, "acme/base-7b", family.base)
    hub_cache(cache, "acme/math-7b", family.finetunes[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/base-7b",
        "models": [{"model": "acme/math-7b", "parameters": {"weight": 0.7}}],
        "dtype": "float16",
    }
    by_id = load_merged(merge(config, tmp_path, "by-id"))
    config |= {"base_model": str(family.base)}
    config["models"][0]["model"] = str(family.finetunes[0])
    by_path = load_merged(merge(config, tmp_path, "by-path"))
    assert by_id.keys() == by_path.keys()
    assert all(torch.equal(by_id[k], by_path[k]) for k in by_id)
    config["models"][0]["model"] = "acme/code-7b"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    err = error_of(capsys, "merge", bad, "-o", tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert "models[0].model: acme/code-7b is not in the Hugging Face cache" in err


def test_a_model_with_its_lora_in_task_arithmetic(models: dict[str, Path], tmp_path: Path) -> None:
    """models[i].loras apply to that model before its task vector is taken: with one model
    at weight 1, the output is the model with its LoRA merged (PEFT's merge_and_unload)."""
    recipe = {
        "method": "task_arithmetic",
        "base": str(models["base"]),
        "models": [
            {"model": str(models["base"]), "loras": [{"path": str(models["lora"]), "weight": 0.5}],
             "parameters": {"weight": 1.0}},
        ],
        "compute": "float32",
        "output": {"dtype": "float32"},
    }  # fmt: skip
    got = load_merged(merge(recipe, tmp_path, "lora"))
    want = peft_merge(models["base"], models["lora"], 0.5)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"models": [{"model": "FT0", "parameters": {"weight": 0.5, "density": 1.5}}]}, "models[0] on model.embed_tokens.weight: dare_ties: density 1.5 is outside (0, 1]"),
        ({"method": "della", "models": [{"model": "FT0", "parameters": {"weight": 0.5, "density": 0.9}}]}, "della"),
        ({"method": "ties", "models": [{"model": "FT0", "parameters": {"density": 0.5}}]}, "weight: no value for models[0]"),
        ({"parameters": {"lambda": [{"filter": "no_such_tensor", "value": 2.0}]}}, "parameters.lambda[0]: filter 'no_such_tensor' matches no tensor"),
        ({"layers_prefix": "model.blocks"}, "model.blocks"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_and_nothing_is_written(
    family: Family,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    expected: str,
) -> None:
    recipe = dare(family) | change
    for m in recipe["models"]:
        if m["model"] == "FT0":
            m["model"] = str(family.finetunes[0])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    err = error_of(capsys, "merge", path, "-o", tmp_path / "out")
    assert expected in err
    assert not (tmp_path / "out").exists()


EXAMPLES = Path(__file__).resolve().parents[1] / "lazymerge" / "examples"


def localized_example(name: str, tmp: Path, paths: dict[str, Path]) -> Path:
    """An example with its `./name` paths pointed at the test's models."""
    text = (EXAMPLES / name).read_text()
    for placeholder, path in paths.items():
        text = text.replace(f"./{placeholder}", str(path))
    out = tmp / name
    out.write_text(text)
    return out


def test_the_examples_run(family: Family, models: dict[str, Path], tmp_path: Path) -> None:
    """Both N-model examples merge as written (paths swapped for the test's models; the
    LoRA is trained on conftest's Llama, so the chat model is that Llama)."""
    math, code = make_llama(tmp_path / "math", seed=11), make_llama(tmp_path / "code", seed=12)
    ties = localized_example(
        "ties-three-models.yaml",
        tmp_path,
        {"llama-2-13b": models["base"], "math-13b": math, "code-13b": code,
         "chat-13b": models["other"], "chat-lora": models["lora"]},
    )  # fmt: skip
    assert run_cli("merge", ties, "-o", tmp_path / "ties", "-q") == 0
    dare_cfg = localized_example(
        "mergekit-dare-ties.yaml",
        tmp_path,
        {"mistral-7b": family.base, "openhermes-7b": family.finetunes[0],
         "metamath-7b": family.finetunes[1], "metamath-lora": family.finetunes[2]},
    )  # fmt: skip
    text = dare_cfg.read_text().replace(
        f"{family.finetunes[1]}+{family.finetunes[2]}", str(family.finetunes[1])
    )
    dare_cfg.write_text(text)
    assert run_cli("merge", dare_cfg, "-o", tmp_path / "dare", "-q") == 0


def test_dare_batch_shards_in_parallel_give_the_merge_bytes(family: Family, tmp_path: Path) -> None:
    """Shards written by separate worker processes, in any order: the same masks."""
    recipe = dare(family) | {"output": {"shard_size": "30KB"}}
    single = shard_hashes(merge(recipe, tmp_path, "d"))
    assert len(single) > 2
    assert run_cli("batch", tmp_path / "d.yaml", "--out-root", tmp_path / "batch", "-j", "2") == 0
    assert shard_hashes(tmp_path / "batch" / "d") == single


@pytest.mark.parametrize(
    ("random", "deterministic", "normalize"),
    [("dare_ties", "ties", True), ("dare_linear", "task_arithmetic", False),
     ("della", "ties", True), ("della_linear", "task_arithmetic", False),
     ("breadcrumbs_ties", "ties", False)],
)  # fmt: skip
def test_at_density_one_the_pruning_methods_are_their_deterministic_counterparts(
    family: Family, tmp_path: Path, random: str, deterministic: str, normalize: bool
) -> None:
    """Nothing pruned, nothing drawn: the same bytes (normalize written out: its default
    differs between ties and dare_ties)."""

    def recipe(method: str) -> dict[str, Any]:
        return dare(family, density=1.0) | {
            "method": method,
            "parameters": {"normalize": normalize},
        }

    assert shard_hashes(merge(recipe(random), tmp_path, "r")) == shard_hashes(
        merge(recipe(deterministic), tmp_path, "d")
    )
