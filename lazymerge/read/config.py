"""A model directory's `config.json`, read and checked when the merge is planned: a
malformed one is refused before anything is written, not discovered after the shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError

CONFIG = "config.json"


def model_dir(path: Path) -> Path:
    """The directory a checkpoint path stands for (a single weights file: its folder)."""
    return path if path.is_dir() else path.parent


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The config.json of the checkpoint at `path` (a directory, or a weights file in
    one); a GGUF file's is built from its metadata."""
    from lazymerge.read.gguf import is_gguf

    if path.is_file() and is_gguf(path):
        from lazymerge.read.gguf_model import gguf_config

        return gguf_config(path)
    return read_config(model_dir(path))


def read_config(directory: Path) -> dict[str, Any] | None:
    """`directory`'s config.json as a JSON object; None when there is none."""
    path = directory / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise InputError(f"{path}: not valid JSON ({why}); fix or remove it") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object; fix or remove it")
    return config
