"""mergekit as the reference: its own pinned venv, and the tiny Llamas both tools merge.

mergekit is never imported here: it runs as `mergekit-yaml` in a venv of its own at
<repo>/.cache/mergekit-<version>/ (git-ignored), built once and reused across test runs.
A venv counts only when its marker file (written last, after an import check) names the
same mergekit and torch; anything else there is a half-built leftover and is rebuilt.
A lock file keeps two pytest processes from building it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

MERGEKIT_VERSION = "0.1.5"
# The same torch as the dev venv: an unpinned one would pull a multi-GB CUDA build.
TORCH_VERSION = version("torch").split("+")[0]
REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
SKIP_VARIABLE = "LAZYMERGE_NO_MERGEKIT"

N_LAYERS = 4
N_FINETUNES = 3


class MergekitUnavailable(Exception):
    """mergekit could not be installed (no PyPI, no wheel for this Python...)."""


# --- mergekit's venv ---------------------------------------------------------------


def venv_dir(cache: Path | None = None) -> Path:
    return (cache or CACHE) / f"mergekit-{MERGEKIT_VERSION}"


def _marker(venv: Path) -> Path:
    return venv / "lazymerge-complete.json"


def _is_complete(venv: Path) -> bool:
    try:
        marker = json.loads(_marker(venv).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("mergekit") == MERGEKIT_VERSION
        and marker.get("torch") == TORCH_VERSION
        and (venv / "bin" / "mergekit-yaml").exists()
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _step(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        tail = "\n".join(lines[-5:]) if lines else f"exit status {done.returncode}"
        raise MergekitUnavailable(f"`{' '.join(cmd[:3])} ...` failed:\n{tail}")
    return done.stdout


def _build(venv: Path) -> None:
    python = str(venv / "bin" / "python")
    pins = [f"mergekit=={MERGEKIT_VERSION}", f"torch=={TORCH_VERSION}"]
    start = time.monotonic()
    _step([sys.executable, "-m", "venv", str(venv)])
    # One resolution with both pins; short network timeouts so an offline machine
    # fails in seconds rather than after pip's retries.
    quiet = ["--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "30"]
    _step([python, "-m", "pip", "install", *quiet, *pins])
    versions = _step([python, "-c", "import mergekit.merge, torch; print(torch.__version__)"])
    freeze = _step([python, "-m", "pip", "freeze", "--all"]).splitlines()
    marker = {
        "mergekit": MERGEKIT_VERSION,
        "torch": TORCH_VERSION,
        "torch_imported": versions.strip(),
        "install_seconds": round(time.monotonic() - start, 1),
        "packages": freeze,
    }
    _marker(venv).write_text(json.dumps(marker, indent=1) + "\n")


def ensure_venv(cache: Path | None = None) -> Path:
    """The venv holding mergekit, built on first use; raises MergekitUnavailable."""
    venv = venv_dir(cache)
    if _is_complete(venv):
        return venv
    with _locked(venv.with_name(venv.name + ".lock")):
        if _is_complete(venv):  # another process built it while we waited
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a leftover nobody may trust
        try:
            _build(venv)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
    return venv


@dataclass(frozen=True)
class Mergekit:
    """`mergekit-yaml` in its own venv, run on the CPU."""

    venv: Path

    @property
    def version(self) -> str:
        return MERGEKIT_VERSION

    def run(
        self, config: dict[str, Any], out: Path, *, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Merge `config` (mergekit's YAML as a dict) into `out`; every output tensor."""
        out.parent.mkdir(parents=True, exist_ok=True)
        config_file = out.parent / f"{out.name}.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [
            str(self.venv / "bin" / "mergekit-yaml"), str(config_file), str(out),
            "--device", "cpu", "--no-lazy-unpickle", "--allow-crimes",
            "--no-copy-tokenizer", "--no-write-model-card",
            "--out-shard-size", "100B",  # one shard whatever the model
            "--quiet",
        ]  # fmt: skip
        if seed is not None:
            cmd += ["--random-seed", str(seed)]
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
            raise AssertionError(
                f"mergekit-yaml failed (exit {done.returncode}) on\n"
                f"{config_file.read_text()}\n{tail}"
            )
        return load_checkpoint(out)


# Many configs in one process of mergekit's venv: its own entry point's steps
# (scripts/run_yaml.py: MergeOptions, apply_global_options, MergeConfiguration,
# run_merge) per job, each job's failure recorded rather than raised. One start-up of
# torch and transformers instead of one per config.
_DRIVER = """
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from transformers import PreTrainedTokenizerFast
jobs = json.load(open(sys.argv[1]))

def config_order(self):  # run_many(ordered=True): see there
    models = [self.base_model, *(m.model for m in self.models or ())]
    models += [src.model for s in self.slices or () for src in s.sources]
    for module in (self.modules or {}).values():
        models += [m.model for m in module.models or ()]
        models += [src.model for s in module.slices or () for src in s.sources]
    return list(dict.fromkeys(m for m in models if m is not None))

def vocab_by_id(self):  # run_many(ordered=True): see there
    return dict(sorted(hashed_vocab(self).items(), key=lambda item: item[1]))

unordered, hashed_vocab = MergeConfiguration.referenced_models, PreTrainedTokenizerFast.get_vocab
for job in jobs:
    MergeConfiguration.referenced_models = config_order if job["ordered"] else unordered
    PreTrainedTokenizerFast.get_vocab = vocab_by_id if job["ordered"] else hashed_vocab
    try:
        options = MergeOptions(device="cpu", allow_crimes=True,
                               copy_tokenizer=job["copy_tokenizer"],
                               write_model_card=False, out_shard_size=10**11, quiet=True,
                               random_seed=job["seed"], lora_merge_cache=job["lora_cache"])
        options.apply_global_options()
        run_merge(MergeConfiguration.model_validate(job["config"]), job["out"], options=options)
        job["error"] = None
    except Exception:
        job["error"] = traceback.format_exc()[-2000:]
json.dump(jobs, open(sys.argv[1], "w"))
"""


def run_many(
    ref: Mergekit,
    jobs: dict[str, tuple[dict[str, Any], Path]],
    seed: int | None = None,
    *,
    copy_tokenizer: bool = False,
    ordered: bool = False,
) -> dict[str, str | None]:
    """Merge every (config, out) of `jobs` in one mergekit process; each job's error
    (None: merged into its `out`).

    `copy_tokenizer`: as mergekit-yaml does by default, write the donor's tokenizer (and
    a `chat_template` with it) where the config names no tokenizer source.
    `ordered`: two iterations whose order mergekit leaves to chance, given one. (1)
    `referenced_models()` is `list(set(...))`: with no base model its first member is
    the donor (output config, tokenizer), and a union tokenizer takes the models' new
    tokens and `chat_template: auto` breaks ties in its order. No PYTHONHASHSEED pins
    it: a ModelReference's hash includes hash(None), on mergekit's Python 3.11 None's
    address (ASLR), and the paths' hashes change with every tmp dir. Here it is the
    config's order: base, then models (or slice sources). (2) A union appends each
    model's new tokens in its `get_vocab()` order: the tokenizers library's Rust
    HashMap, seeded anew in every process. Here that is by id. Both are orders mergekit
    may take on any run.
    """
    if not jobs:
        return {}
    listing = next(iter(jobs.values()))[1].parent / "mergekit-jobs.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps([
        {"name": k, "config": c, "out": str(o), "seed": seed,
         "lora_cache": str(listing.parent / "mergekit-lora-cache"),
         "copy_tokenizer": copy_tokenizer, "ordered": ordered}
        for k, (c, o) in jobs.items()
    ]))  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    python = str(ref.venv / "bin" / "python")
    done = subprocess.run(
        [python, "-c", _DRIVER, str(listing)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise AssertionError(f"mergekit driver failed: {done.stderr[-2000:]}")
    return {job["name"]: job["error"] for job in json.loads(listing.read_text())}


def merge_all(
    ref: Mergekit, root: Path, configs: dict[tuple[str, torch.dtype], dict[str, Any]]
) -> dict[tuple[str, torch.dtype], Path]:
    """Every (case, dtype)'s config merged by mergekit in one process (run_many) under
    `root`; fails naming every config mergekit refused."""
    names = {key: f"{key[0]}-{str(key[1]).removeprefix('torch.')}" for key in configs}
    jobs = {names[k]: (cfg, root / names[k]) for k, cfg in configs.items()}
    errors = {k: e for k, e in run_many(ref, jobs).items() if e}
    assert not errors, errors
    return {k: root / names[k] for k in configs}


def run_kernels(
    venv: Path, tensors: dict[str, torch.Tensor], cases: list[dict[str, Any]], root: Path
) -> dict[str, Any]:
    """mergekit's own method code on whole tensors (tests/mergekit_kernels.py, run by its
    venv's python): {"results": tensors by case, "errors": by case}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file(tensors, str(root / "cases.safetensors"), metadata={"cases": json.dumps(cases)})
    script = Path(__file__).with_name("mergekit_kernels.py")
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(script), str(root / "cases.safetensors"), str(root / "out.safetensors")],
        capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(str(root / "out.safetensors"), "pt") as f:
        results = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        errors = json.loads(f.metadata()["errors"])
    return {"results": results, "errors": errors}


def reference() -> Mergekit:
    """The reference for the `mergekit` fixture; MergekitUnavailable names the fix."""
    try:
        return Mergekit(ensure_venv())
    except MergekitUnavailable as e:
        raise MergekitUnavailable(
            f"cannot install mergekit=={MERGEKIT_VERSION} (with torch=={TORCH_VERSION}) "
            f"into {venv_dir()}: the mergekit reference tests need PyPI once. "
            f"Set {SKIP_VARIABLE}=1 to skip them.\n{e}"
        ) from None


# --- inputs: a tiny Llama base and fine-tunes of it -----------------------------------


def llama_config(vocab: int, hidden: int, intermediate: int, layers: int):  # type: ignore[no-untyped-def]
    """A tiny untied Llama (4 heads, 2 KV heads): the test models' shape, sizes apart."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=hidden,
        tie_word_embeddings=False,
    )


def tiny_config():  # type: ignore[no-untyped-def]
    return llama_config(96, 32, 80, N_LAYERS)


@dataclass(frozen=True)
class Family:
    """A base and its fine-tunes, all in one dtype."""

    dtype: torch.dtype
    base: Path
    finetunes: tuple[Path, ...]

    @property
    def models(self) -> tuple[Path, ...]:
        return (self.base, *self.finetunes)


def base_weights(seed: int) -> dict[str, torch.Tensor]:
    """A random Llama's fp32 state dict; norms are not all ones, as trained ones are not."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, w in weights.items():
        if "norm" in name:
            w.add_(0.1 * torch.randn_like(w))
    return weights


def finetune_deltas(
    base: dict[str, torch.Tensor], n: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """n sets of small deltas: a share common to all plus a larger private part.

    The common share makes signs agree more often than chance, the private part makes
    TIES' sign vote split: both outcomes occur in every tensor. Sizes are ~3% of each
    tensor's spread, so task vectors are small next to the weights, as in fine-tuning.
    """
    generator = torch.Generator().manual_seed(seed)
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, w in base.items():
        scale = 0.03 * float(w.float().std()) if w.numel() > 1 else 0.03
        common = torch.randn(w.shape, generator=generator)
        for i in range(n):
            private = torch.randn(w.shape, generator=generator)
            deltas[i][name] = scale * (0.5 * common + private) * (1.0 + 0.5 * i)
    return deltas


def save_llama(weights: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype) -> Path:
    """Save through transformers' save_pretrained (safetensors, config.json with dtype)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config())
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
    model.to(dtype).save_pretrained(directory)
    return directory


def make_family(root: Path, dtype: torch.dtype, seed: int = 0) -> Family:
    """A tiny random Llama base and N_FINETUNES fine-tunes (base + deltas) in `dtype`.

    Each model is rounded from fp32 to `dtype` once, so a fine-tune's task vector is
    (base + delta) rounded minus base rounded, as with real checkpoints. No tokenizer:
    mergekit is told not to copy one.
    """
    base = base_weights(seed)
    deltas = finetune_deltas(base, N_FINETUNES, seed + 1)
    name = str(dtype).removeprefix("torch.")
    base_dir = save_llama(base, root / f"base-{name}", dtype)
    finetunes = tuple(
        save_llama({k: base[k] + d[k] for k in base}, root / f"ft{i}-{name}", dtype)
        for i, d in enumerate(deltas)
    )
    return Family(dtype, base_dir, finetunes)


def load_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, sharded or not."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(directory / "model.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(directory / shard)))
    assert set(tensors) == set(weight_map), f"{directory}: index and shards disagree"
    return tensors
