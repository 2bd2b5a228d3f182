"""The output's tokenizer and chat template, as a recipe gives them.

mergekit's spellings (`tokenizer_source: base | union | <model>`, or a `tokenizer:` block
with `source` and `tokens` overrides, and `chat_template`) and the native recipe's
(`tokenizer: {source, tokens}`, `chat_template`) become a `TokenizerSpec` and a template
text. Every model a source names must be one of the recipe's (by path); a template is
`auto`, a built-in's name (lazymerge/templates/), or Jinja text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Literal

from lazymerge.errors import RecipeError
from lazymerge.recipe.spec import ModelSpec, TokenizerSpec, TokenRule, TokenSource

Locate = Callable[[Any, str], ModelSpec]  # a model reference -> the model it names
# Built-in chat templates by name (mergekit's names; our own text, same rendering).
TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def mergekit_tokenizer(
    data: dict[str, Any], models: Sequence[ModelSpec], locate: Locate, source: str
) -> TokenizerSpec | None:
    """A mergekit config's `tokenizer_source` or `tokenizer:` block (not both)."""
    given, block = data.get("tokenizer_source"), data.get("tokenizer")
    if given is not None and block is not None:
        raise RecipeError(
            f"{source}: tokenizer: give tokenizer_source or a tokenizer: block, not both "
            "(mergekit refuses both)"
        )
    if given is not None:
        return TokenizerSpec(_source(given, models, locate, f"{source}: tokenizer_source"))
    return None if block is None else tokenizer_block(block, models, locate, f"{source}: tokenizer")


def tokenizer_block(
    block: object, models: Sequence[ModelSpec], locate: Locate, where: str
) -> TokenizerSpec:
    """`{source, tokens}`: the source defaults to union, as mergekit's does."""
    if not isinstance(block, dict):
        raise RecipeError(f"{where}: expected a mapping with source and tokens")
    unknown = sorted(str(k) for k in block if k not in ("source", "tokens", "pad_to_multiple_of"))
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; it takes source and tokens")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"{where}.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    src = _source(block.get("source", "union"), models, locate, f"{where}.source")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise RecipeError(f"{where}.tokens: expected a mapping of token -> {{source, force}}")
    rules = tuple(
        _rule(str(tok), cfg, models, locate, f"{where}.tokens[{tok!r}]")
        for tok, cfg in tokens.items()
    )
    return TokenizerSpec(src, rules, pad)


def _source(
    value: object, models: Sequence[ModelSpec], locate: Locate, where: str
) -> Literal["base", "union"] | ModelSpec:
    if value == "base" or value == "union":
        return value
    if not isinstance(value, str):
        raise RecipeError(f"{where}: expected base, union or a model of the config, got {value!r}")
    return among(locate(value, where), models, where)


def among(model: ModelSpec, models: Sequence[ModelSpec], where: str) -> ModelSpec:
    """The recipe's model at `model`'s path (its LoRAs included): a source must be one."""
    for m in models:
        if m.path == model.path:
            return m
    raise RecipeError(
        f"{where}: {model.path} is not a model of this config; name one of "
        + ", ".join(str(m.path) for m in models)
    )


def _rule(
    token: str, cfg: object, models: Sequence[ModelSpec], locate: Locate, where: str
) -> TokenRule:
    if not isinstance(cfg, dict) or any(k not in ("source", "force") for k in cfg):
        raise RecipeError(f"{where}: expected {{source, force}}")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force: expected true or false, got {force!r}")
    return TokenRule(token, _token_source(cfg.get("source"), models, locate, where), force)


def _token_source(
    value: object, models: Sequence[ModelSpec], locate: Locate, where: str
) -> TokenSource | None:
    """None, `base`, a model, {kind: zero}, or {kind: model_token, model, token|token_id}."""
    where = f"{where}.source"
    if value is None:
        return None
    if value == "base":
        return TokenSource(models[0])
    if isinstance(value, str):
        return TokenSource(among(locate(value, where), models, where))
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "zero" and isinstance(value, dict) and set(value) == {"kind"}:
        return TokenSource()
    if kind != "model_token" or not isinstance(value, dict):
        raise RecipeError(
            f"{where}: expected a model, {{kind: zero}} or {{kind: model_token, model, token}}"
        )
    extra = sorted(str(k) for k in value if k not in ("kind", "model", "token", "token_id"))
    if extra or "model" not in value or (("token" in value) == ("token_id" in value)):
        raise RecipeError(f"{where}: model_token takes model and one of token, token_id")
    model = among(locate(value["model"], f"{where}.model"), models, f"{where}.model")
    token_id = value.get("token_id")
    if token_id is not None and (not isinstance(token_id, int) or token_id < 0):
        raise RecipeError(f"{where}.token_id: expected a token id, got {token_id!r}")
    token = value.get("token")
    if token is not None and not isinstance(token, str):
        raise RecipeError(f"{where}.token: expected a token's text, got {token!r}")
    return TokenSource(model, token, token_id)


def chat_template(value: object, where: str) -> str | None:
    """`auto`, a built-in's text, or a Jinja template (what mergekit accepts as one)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError(f"{where}: expected a template name or Jinja text, got {value!r}")
    if value == "auto":
        return value
    if value in TEMPLATES:
        return builtin_template(value)
    if len(value) < 20 or "{" not in value:
        raise RecipeError(
            f"{where}: {value!r} is neither a built-in template ({', '.join(TEMPLATES)}, "
            "auto) nor Jinja text"
        )
    return value


def builtin_template(name: str) -> str:
    return (resources.files("lazymerge") / "templates" / f"{name}.jinja").read_text("utf-8")
