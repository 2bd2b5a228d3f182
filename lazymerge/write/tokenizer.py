"""The output's tokenizer files: the source model's (the base's unless the recipe names
another), tokenizer.json replaced when tokens were added (its added tokens then listed in
tokenizer_config.json too, as transformers saves them), and the chat template written
into tokenizer_config.json (template files of the source left behind, since transformers
prefers them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.plan.model import MergePlan
from lazymerge.read.config import model_dir
from lazymerge.read.tokenizer import (
    TEMPLATE_FILES,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    tokenizer_config,
)

# Files that hold a tokenizer's vocabulary in another form: stale once tokens are added.
VOCAB_FILES = ("tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")
FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", *VOCAB_FILES, *TEMPLATE_FILES)


@dataclass(frozen=True)
class TokenizerFiles:
    """What the output's tokenizer is made of: files copied as they are, tokenizer.json's
    new text, and the tokenizer_config.json to write over the copied one."""

    copies: tuple[Path, ...]
    text: str | None = None
    config: dict[str, Any] | None = None


def tokenizer_files(plan: MergePlan) -> TokenizerFiles:
    """The output's tokenizer files (write/output.py writes them)."""
    tok, template = plan.tokenizer, plan.chat_template
    source = tok.files if tok is not None else model_dir(plan.base.path)
    text = tok.text if tok is not None else None
    skip = set(VOCAB_FILES if text is not None else ()) | set(
        TEMPLATE_FILES if template is not None else ()
    )
    copies = tuple(source / n for n in FILES if n not in skip and (source / n).is_file())
    if text is None and template is None:
        return TokenizerFiles(copies)
    config = tokenizer_config(source)
    if text is not None:
        config["added_tokens_decoder"] = _decoder(text)
    if template is not None:
        config["chat_template"] = template
    return TokenizerFiles(copies, text, config)


def _decoder(text: str) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`: tokenizer.json's added tokens by id."""
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    added = json.loads(text).get("added_tokens") or []
    return {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added}
