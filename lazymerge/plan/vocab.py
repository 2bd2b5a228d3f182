"""The output's tokenizer (the recipe's `tokenizer:` source) and, for the tensors whose
rows are the vocabulary (embed_tokens, lm_head), each model's rows aligned to it by token
(meaning/vocab.py): decided from the tokenizer files before any tensor is read.

A model whose rows already are the output's, one for one, is read as it is; any other is
read through a `RowMap` (plan/model.py): its rows gathered by token, the defaults made
from other models' rows (run/rows.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.vocab import (
    Alignment,
    RowRule,
    align,
    conflicts,
    permutation,
    union_tokens,
)
from lazymerge.plan.model import MergePlan
from lazymerge.read.config import model_dir
from lazymerge.read.tokenizer import Tokenizer, chat_template, read_tokenizer
from lazymerge.recipe.spec import ModelSpec, TokenizerSpec, TokenRule


@dataclass(frozen=True)
class OutputTokenizer:
    """The tokenizer files the output gets: `files`' as they are, or with tokenizer.json
    replaced by `text` (tokens added: `added` of them)."""

    source: str  # "base", "union", or the model's path
    files: Path  # the model directory the files come from
    text: str | None
    added: int
    size: int  # tokens in all
    notes: tuple[str, ...] = ()  # what the user should know (added tokens' settings)
    pad: int = 1  # the rows are a multiple of this (pad_to_multiple_of)

    @property
    def rows(self) -> int:
        """The output's vocabulary rows: `size` rounded up to a multiple of `pad`."""
        return -(-self.size // self.pad) * self.pad


@dataclass(frozen=True, eq=False)
class VocabPlan:
    """The output tokenizer, every model's tokenizer, and the rows each output token takes."""

    out: OutputTokenizer
    vocab: dict[str, int]  # the output's token -> id
    models: tuple[Path, ...]  # the recipe's models' directories (model_dir), base first
    perms: tuple[np.ndarray, ...]  # per model: its row for each output token, or ABSENT
    spec: TokenizerSpec
    tokenizers: tuple[Tokenizer, ...]
    _aligned: dict[tuple[Any, ...], Alignment] = field(default_factory=dict, repr=False)

    def alignment(self, among: tuple[Path, ...], base: Path | None) -> Alignment:
        """The rows for a tensor whose inputs are the models at `among` (mergekit counts
        a token's holders among the tensor's own models); computed once per input set."""
        key = (among, base)
        if key not in self._aligned:
            self._aligned[key] = self._align(among, base)
        return self._aligned[key]

    def _align(self, among: tuple[Path, ...], base: Path | None) -> Alignment:
        at = [self.models.index(p) for p in among]
        perms = [self.perms[i] for i in at]
        where = {p: k for k, p in enumerate(among)}
        rules = {r.token: self._rule(r, where) for r in self.spec.tokens}
        try:
            return align(self.vocab, perms, where.get(base) if base else None, rules)
        except ValueError as e:
            raise RecipeError(f"tokenizer.tokens: {e}") from None

    def _rule(self, rule: TokenRule, where: dict[Path, int]) -> RowRule:
        """A `tokens:` rule as rows of the tensor's inputs."""
        src, at = rule.source, f"tokenizer.tokens[{rule.token!r}].source"
        if src is None:
            return RowRule(None, rule.force)
        if src.model is None:
            return RowRule((), rule.force)
        path = model_dir(src.model.path)
        if path not in where:
            raise RecipeError(f"{at}: {src.model.path} has no rows in this tensor's merge")
        k = self.models.index(path)
        return RowRule(((where[path], self._row(k, rule, at)),), rule.force)

    def _row(self, k: int, rule: TokenRule, at: str) -> int:
        src, tok = rule.source, self.tokenizers[k]
        assert src is not None
        if src.token_id is not None:
            row = src.token_id
        elif src.token is not None:
            row = tok.vocab.get(src.token, -1)
        else:
            row = int(self.perms[k][self.vocab[rule.token]])
        if not 0 <= row < tok.rows:
            which = src.token if src.token is not None else (src.token_id or rule.token)
            raise RecipeError(f"{at}: {tok.path} has no row for token {which!r}")
        return row


def plan_vocab(spec: TokenizerSpec, models: Sequence[ModelSpec]) -> VocabPlan:
    """Read every model's tokenizer and decide the output's (models: base first)."""
    toks = tuple(read_tokenizer(m.path, f"model {m.path}:") for m in models)
    for t in toks:
        _check_rows(t)
    out, vocab = _output(spec, toks, [m.path for m in models])
    out = replace(out, pad=spec.pad or 1)
    perms = tuple(permutation(vocab, t.ids()) for t in toks)
    return VocabPlan(out, vocab, tuple(t.path for t in toks), perms, spec, toks)


def _check_rows(t: Tokenizer) -> None:
    """mergekit drops a tokenizer's tokens past the model's rows only from the base's
    tokenizer, and fails on any other's: one line here."""
    past = [tok for tok, i in t.vocab.items() if i >= t.rows]
    if past:
        raise InputError(
            f"{t.path}: its tokenizer has {len(past)} tokens past the model's {t.rows} "
            f"vocabulary rows (e.g. {past[0]!r}); aligning vocabularies needs a row for each"
        )


def _output(
    spec: TokenizerSpec, toks: Sequence[Tokenizer], paths: Sequence[Path]
) -> tuple[OutputTokenizer, dict[str, int]]:
    """The output's tokenizer: the base's, a model's, or the union; then the `tokens:`
    rules' tokens it lacks, appended."""
    plain: list[str] = []
    added: dict[str, dict[str, Any]] = {}
    if spec.source == "union":
        start, name = toks[0], "union"
        plain, added = union_tokens([t.ids() for t in toks], [t.added for t in toks])
    elif spec.source == "base":
        start, name = toks[0], "base"
    else:
        k = paths.index(spec.source.path)
        start, name = toks[k], str(paths[k])
    extra = [r.token for r in spec.tokens]
    if not plain and not added and all(t in start.vocab for t in extra):
        return OutputTokenizer(name, start.path, None, 0, len(start.vocab)), dict(start.vocab)
    text, vocab = _added(start, plain, list(added.values()), extra)
    grown = len(vocab) - len(start.vocab)
    notes = _conflicts(toks) if spec.source == "union" else ()
    return OutputTokenizer(name, start.path, text, grown, len(vocab), notes), vocab


def _conflicts(toks: Sequence[Tokenizer]) -> tuple[str, ...]:
    """Tokens models add with different settings: the first model's are kept (mergekit
    warns and does the same); said in the plan, not a log."""
    return tuple(
        f"tokenizer: {token!r} is added with other settings by {toks[k].path} "
        "(special, lstrip, rstrip...); the first model's are kept, as mergekit keeps them"
        for token, k in conflicts([t.added for t in toks])
    )


def _added(
    start: Tokenizer, plain: list[str], added: list[dict[str, object]], extra: list[str]
) -> tuple[str, dict[str, int]]:
    """`start`'s tokenizer.json with tokens added as transformers' add_tokens adds them
    (the tokenizers library's own rule for the ids): the plain ones it lacks, the added
    ones with their settings, then the rules' tokens it still lacks."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Rust

    # One call per kind: the library gives ids in list order as one call per token would
    # (mergekit's), but rebuilds its matcher once rather than per token.
    rust = Rust.from_str(start.text)
    rust.add_tokens([t for t in plain if t not in start.vocab])
    keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
    rust.add_tokens([AddedToken(str(e["content"]), **{k: e[k] for k in keys}) for e in added])
    have = rust.get_vocab(with_added_tokens=True)
    rust.add_tokens([t for t in dict.fromkeys(extra) if t not in have])
    return rust.to_str(), rust.get_vocab(with_added_tokens=True)


def with_tokenizer(plan: MergePlan, vocab: VocabPlan | None) -> MergePlan:
    """The plan with its output tokenizer and chat template decided, and config.json's
    vocabulary size the output's."""
    recipe = plan.recipe
    template = _template(recipe.chat_template, recipe.models())
    if vocab is None and template is None:
        return plan
    if recipe.output.format == "gguf" and (template is not None or _changes(vocab, plan)):
        raise RecipeError(
            "output.format gguf: a tokenizer other than the base's, or a chat_template, is "
            "not supported yet in a GGUF; write safetensors"
        )
    config = plan.config
    if vocab is not None and config is not None:
        config = _vocab_size(config, vocab.out.rows)
    out = vocab.out if vocab is not None else None
    notes = plan.notes + (out.notes if out is not None else ())
    return replace(plan, config=config, tokenizer=out, chat_template=template, notes=notes)


def _changes(vocab: VocabPlan | None, plan: MergePlan) -> bool:
    return vocab is not None and (
        vocab.out.text is not None
        or vocab.out.files != model_dir(plan.base.path)
        or vocab.out.rows != vocab.out.size
    )


def _vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """config.json with the output's vocabulary size, where it keeps one (a multimodal
    config in its text_config)."""
    config = dict(config)
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        config["text_config"] = text | {"vocab_size": size}
    else:
        config["vocab_size"] = size
    return config


def _template(given: str | None, models: Sequence[ModelSpec]) -> str | None:
    """The template to write: the given text, or for `auto` the inputs' most common one
    (the first in the recipe's order among equals; none: nothing to write)."""
    if given != "auto":
        return given
    found = [t.strip() for m in models if (t := chat_template(model_dir(m.path))) is not None]
    return Counter(found).most_common(1)[0][0] if found else None
