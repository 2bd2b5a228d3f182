"""A model's tokenizer as a merge needs it, from its files alone (no transformers):
every token's id (the vocabulary and the added tokens, as `get_vocab()` gives them), the
added tokens' settings, and its chat template.

Only tokenizer.json (a "fast" tokenizer) is read: aligning vocabularies needs the token
strings, which a bare sentencepiece `tokenizer.model` keeps in a protobuf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError
from lazymerge.read.config import model_dir, read_config

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class Tokenizer:
    """One model's tokenizer: `vocab` is token -> id for every token (added ones too),
    `added` the tokenizer.json entries of the added tokens, `rows` how many embedding
    rows its config says the model has (mergekit's vocab_size)."""

    path: Path  # the model directory
    text: str  # tokenizer.json as it is
    vocab: dict[str, int]
    added: tuple[dict[str, Any], ...]
    rows: int

    def ids(self) -> dict[str, int]:
        """The tokens the model has rows for (an id below `rows`)."""
        return {t: i for t, i in self.vocab.items() if i < self.rows}


def read_tokenizer(path: Path, where: str) -> Tokenizer:
    """The tokenizer of the model at `path` (a directory or a weights file in one)."""
    directory = model_dir(path)
    file = directory / TOKENIZER_JSON
    if not file.is_file():
        raise InputError(
            f"{where} {directory} has no {TOKENIZER_JSON}; aligning vocabularies needs each "
            "model's tokenizer.json (save the tokenizer with transformers to make one)"
        )
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        vocab = _model_vocab(data["model"])
        added = tuple(data.get("added_tokens") or ())
        vocab |= {t["content"]: int(t["id"]) for t in added}
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where} {file}: not a tokenizer.json transformers reads ({e})") from None
    return Tokenizer(directory, text, vocab, added, _rows(directory, vocab, where))


def _model_vocab(model: dict[str, Any]) -> dict[str, int]:
    """token -> id of the tokenizer model: a mapping (BPE, WordPiece, WordLevel) or
    Unigram's list of [piece, score], whose ids are the positions."""
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        return {str(t): int(i) for t, i in vocab.items()}
    return {str(entry[0]): i for i, entry in enumerate(vocab)}


def _rows(directory: Path, vocab: dict[str, int], where: str) -> int:
    """The config's vocab_size (a multimodal config's text_config's); without one, the
    tokenizer's own size."""
    config = read_config(directory) or {}
    for scope in (config, config.get("text_config") or {}):
        size = scope.get("vocab_size") if isinstance(scope, dict) else None
        if isinstance(size, int) and size > 0:
            return size
    return max(vocab.values(), default=-1) + 1


def tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json (empty when there is none)."""
    file = directory / TOKENIZER_CONFIG
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def chat_template(directory: Path) -> str | None:
    """The template transformers would load: chat_template.jinja, chat_template.json,
    else tokenizer_config.json's (a list of named ones: the one named `default`)."""
    jinja = directory / TEMPLATE_FILES[0]
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    holder: dict[str, Any] = tokenizer_config(directory)
    if (directory / TEMPLATE_FILES[1]).is_file():
        holder = json.loads((directory / TEMPLATE_FILES[1]).read_text(encoding="utf-8"))
    template = holder.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
