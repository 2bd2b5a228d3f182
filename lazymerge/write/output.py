"""The output directory's lifecycle, and the only code that writes lazymerge.json,
config.json, the tokenizer files, the model card and the index.

    check_dir        the output resolved; no overlap with an input, not a file
    complete_merge   this very merge, already finished there (--resume leaves it be)
    prepare_dir      creates it (or says why it cannot), clears a previous merge's files
    Output.start     the first manifest (recipe hash, input fingerprints); shards a resume keeps
    Output.progress  the manifest again after each shard
    Output.finish    config, tokenizer files, complete manifest, card, and last the index

The index is what makes a directory a loadable model: an interrupted merge never has one,
only `.partial` shards and an incomplete manifest, which `--resume` judges.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lazymerge.errors import OutputError
from lazymerge.plan.model import MergePlan
from lazymerge.read.checkpoint import SAFETENSORS_INDEX
from lazymerge.read.config import CONFIG, model_dir
from lazymerge.read.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON
from lazymerge.recipe.spec import DTYPE_LABELS
from lazymerge.write.manifest import MANIFEST, Record, completed_shards, finished_shards
from lazymerge.write.safetensors import PARTIAL, ShardResult
from lazymerge.write.tokenizer import FILES as TOKENIZER_FILES
from lazymerge.write.tokenizer import TokenizerFiles, tokenizer_files

CARD = "README.md"
PICTURE = "blend.png"
# Files a merge writes besides shards, index and manifest (--overwrite replaces them).
OWN_FILES = (CONFIG, CARD, PICTURE)
# Files a model directory needs besides weights; copied from the base as they are.
# From the base, as they are: generation settings, a vision-language model's processors.
EXTRA_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")
AUX_FILES = (*TOKENIZER_FILES, *EXTRA_FILES)


class Card(Protocol):
    """The model card's content (lazymerge.views.card makes one)."""

    def picture(self, dest: Path) -> bool:
        """Put the blend picture at `dest`; False when there is none."""
        ...

    def text(self, picture: str | None, out: Path) -> str:
        """README.md's text; `picture` is the picture's file name when there is one, `out`
        the output directory (the card's paths are relative to it)."""
        ...


def check_dir(out: Path, inputs: Sequence[Path]) -> Path:
    """The output directory, resolved, once it is known not to be, hold or lie inside an
    input, nor to be a file; nothing is created or changed."""
    out = out.expanduser().resolve()
    for p in inputs:
        p = p.resolve()
        if out == p or p in out.parents or out in p.parents:
            raise OutputError(f"output {out} overlaps input {p}; choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    return out


def prepare_dir(out: Path, inputs: Sequence[Path], overwrite: bool, resume: bool = False) -> Path:
    """Check the output directory is safe to use and clear what a previous merge left.

    With `resume`, a previous attempt's files stay for the resume logic to judge.
    """
    out = check_dir(out, inputs)
    _make_dir(out)
    existing = sorted(out.iterdir())
    if existing and not (overwrite or resume):
        if _holds_complete_merge(out):
            raise OutputError(
                f"output {out} already holds a complete merge (lazymerge verify {out} "
                "checks it); pass --overwrite to replace it"
            )
        raise OutputError(
            f"output {out} is not empty; pass --resume to continue an interrupted merge "
            "or --overwrite to replace its merge files"
        )
    # The index goes first: while shards are being replaced, the directory must not
    # look like a complete model.
    (out / SAFETENSORS_INDEX).unlink(missing_ok=True)
    if resume:
        return out
    (out / MANIFEST).unlink(missing_ok=True)
    for f in existing:
        if f.is_file() and (
            f.name.endswith((".safetensors", ".gguf", PARTIAL))
            or f.name in AUX_FILES
            or f.name in OWN_FILES
        ):
            f.unlink()
    return out


def complete_merge(out: Path, plan: MergePlan, record: Record) -> list[ShardResult] | None:
    """The shards of `out` when it already holds this very merge, finished (same recipe,
    inputs and lazymerge: manifest.finished_shards), as its manifest records them; else None.
    Refuses (OutputError) a finished merge there from another recipe or other inputs."""
    return finished_shards(out, plan, record) if out.is_dir() else None


def _holds_complete_merge(out: Path) -> bool:
    """Whether `out` looks like a finished merge: an index and a complete manifest."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        ((out / SAFETENSORS_INDEX).is_file() or any(out.glob("*.gguf")))
        and isinstance(manifest, dict)
        and manifest.get("status") == "complete"
    )


def _make_dir(out: Path) -> None:
    """Create the output directory (and its parents); if that fails, one line saying why."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {out}: {_why_not(out, e)}") from None


def _why_not(out: Path, e: OSError) -> str:
    """Why a directory cannot be made at `out`, from the nearest ancestor that exists."""
    parent = next((p for p in out.parents if p.exists()), Path(out.anchor))
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if e.errno == errno.ENOENT:  # the parent exists, yet refuses new entries: /proc, /sys
        return f"{parent} does not accept new directories; choose a directory on a disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to create it in {parent}"
    if e.errno == errno.EROFS:
        return f"{parent} is on a read-only filesystem"
    if e.errno == errno.ENOSPC:
        return f"no space left on the device of {parent}"
    return f"{e.strerror or e} (in {parent})"


@dataclass(frozen=True)
class Output:
    """A prepared output directory (see prepare_dir) and the merge being written into it."""

    path: Path
    plan: MergePlan
    record: Record

    def start(self, resume: bool) -> dict[str, ShardResult]:
        """Write the first, incomplete manifest; returns the shards an earlier attempt
        completed that are still intact (`resume`), by name."""
        kept = completed_shards(self.path, self.plan, self.record) if resume else {}
        # The first record: fingerprints to resume against, even if shard 1 never ends.
        self.progress(list(kept.values()))
        return kept

    def progress(self, shards: Sequence[ShardResult]) -> None:
        """The manifest, incomplete, with the shards done so far."""
        write_json(self.path / MANIFEST, self.record.data(shards, complete=False))

    def finish(
        self, shards: Sequence[ShardResult], card: Card | None, nonfinite: Sequence[str] = ()
    ) -> None:
        """Config, tokenizer files, the complete manifest, the card, and last the index."""
        plan, out = self.plan, self.path
        gguf = plan.recipe.output.format == "gguf"  # one file, config and tokenizer inside
        if plan.config is not None and not gguf:
            write_json(out / CONFIG, _config(plan.config, plan.out_dtype))
        base_dir = model_dir(plan.base.path)
        if not gguf:
            _write_tokenizer(out, tokenizer_files(plan))
            for name in EXTRA_FILES:
                if (base_dir / name).is_file():
                    shutil.copyfile(base_dir / name, out / name)
        extra = {"nonfinite": list(nonfinite)} if nonfinite else {}
        write_json(out / MANIFEST, self.record.data(shards, complete=True, **extra))
        if card is not None:
            picture = PICTURE if card.picture(out / PICTURE) else None
            (out / CARD).write_text(card.text(picture, out), encoding="utf-8")
        if not gguf:
            weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
            index = {"metadata": {"total_size": plan.bytes_to_write}, "weight_map": weight_map}
            write_json(out / SAFETENSORS_INDEX, index)
        _fsync_dir(out)


@contextlib.contextmanager
def output_errors(out: Path, again: str = "run the same command with --resume") -> Iterator[None]:
    """An OSError while writing becomes one OutputError line that says what to do."""
    try:
        yield
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(
            f"writing {out}: {what}; the output is incomplete (.partial shards, no index); "
            f"fix that and {again}"
        ) from e


def _write_tokenizer(out: Path, files: TokenizerFiles) -> None:
    """The tokenizer source's files, then tokenizer.json and tokenizer_config.json where
    the plan changes them."""
    for f in files.copies:
        shutil.copyfile(f, out / f.name)
    if files.text is not None:
        (out / TOKENIZER_JSON).write_text(files.text, encoding="utf-8")
    if files.config is not None:
        write_json(out / TOKENIZER_CONFIG, files.config)


def _config(config: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """The base's config with its dtype field saying the output's."""
    config = dict(config)
    if dtype is not None:
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = DTYPE_LABELS[dtype]
    return config


def write_json(path: Path, data: object) -> None:
    """Atomically: a temporary file, fsynced, renamed over the target."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
