"""Tiny Llamas with real, different tokenizers and chat templates (issue 17's fixture).

A base and four fine-tunes of it, fp16, each carrying a tokenizer trained here
(lazymerge/testing_tokenizer.py). A fine-tune's embedding row for a token the base also
has is the base's row plus a small delta, as after fine-tuning; a token of its own gets
a fresh row. Every model's config vocab_size equals its embedding's rows.

- base: 96 tokens (seed 0), the stock template.
- wide: 100 tokens of another corpus (seed 1), its embedding padded to 128 rows (as
  real checkpoints pad theirs to a multiple of 64): rows 100..127 belong to no token.
- chat: 104 tokens (seed 2) + ChatML's two special tokens, a non-special `<think>` and
  `overlap`, a special token whose string is a plain (BPE) token of the base's (a union
  keeps the base's id for it but makes it an added token with chat's settings); its
  pad token `<|im_end|>`; its `<|eot_id|>` set to rstrip (a union keeps the base's
  settings for it, with a warning).
- same1, same2: the base's very tokenizer (same vocabulary, same embedding shape).

wide, chat, same1 and same2 share the template FINETUNE_TEMPLATE: `chat_template:
auto` picks it over the base's wherever two of them are merged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lazymerge.testing_tokenizer import write_tokenizer

from mergekit_ref import llama_config

HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 2
# A trailing newline, as templates saved from a file often have: `auto` strips it.
FINETUNE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}\n"
)
CHATML = ("<|im_start|>", "<|im_end|>")
THINK = "<think>"


@dataclass(frozen=True)
class Models:
    base: Path
    wide: Path
    chat: Path
    same1: Path
    same2: Path
    overlap: str  # chat's added special token that is a plain token of the base

    def vocab(self, name: str) -> dict[str, int]:
        """A model's tokenizer's token -> id."""
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(getattr(self, name)).get_vocab())


def make_models(root: Path) -> Models:
    base_tok = _tokenizer(root / "base", 96, 0, None)
    base = _base_weights(len(base_tok), seed=10)
    _save(base, root / "base")
    paths = {"base": root / "base"}
    overlap = ""
    # name: (tokens trained, tokenizer seed, embedding rows: None for as many as tokens)
    finetunes = {
        "wide": (100, 1, 128),
        "chat": (104, 2, None),
        "same1": (96, 0, None),
        "same2": (96, 0, None),
    }
    for i, (name, (vocab, seed, rows)) in enumerate(finetunes.items()):
        tok = _tokenizer(root / name, vocab, seed, FINETUNE_TEMPLATE)
        if name == "chat":
            overlap = min(t for t in set(base_tok) - set(tok) if len(t) > 1 and t.isalpha())
            tok = _add_chat_tokens(root / name, overlap)
        weights = _finetune(base, base_tok, tok, rows or len(tok), seed=20 + i)
        paths[name] = _save(weights, root / name)
    return Models(**paths, overlap=overlap)


def _tokenizer(directory: Path, vocab: int, seed: int, template: str | None) -> dict[str, int]:
    write_tokenizer(directory, vocab, seed=seed)
    if template is not None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return _vocab(directory)


def _add_chat_tokens(directory: Path, overlap: str) -> dict[str, int]:
    """ChatML's tokens and `overlap`, special, and `<think>`, not, added the way people
    add them (transformers, saved by save_pretrained); `<|eot_id|>` made rstrip by hand."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML])
    tok.add_tokens([AddedToken(THINK, special=False, normalized=False)])
    tok.add_tokens([AddedToken(overlap, special=True, normalized=False)])
    tok.pad_token = CHATML[1]
    tok.save_pretrained(directory)
    saved = json.loads((directory / "tokenizer.json").read_text())
    for added in saved["added_tokens"]:
        if added["content"] == "<|eot_id|>":
            added["rstrip"] = True
    (directory / "tokenizer.json").write_text(json.dumps(saved, indent=2))
    return _vocab(directory)


def _vocab(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(directory).get_vocab())


def _base_weights(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A random Llama's fp32 state dict; norms not all ones, as trained ones are not."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab, HIDDEN, INTERMEDIATE, LAYERS))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, w in weights.items():
        if "norm" in name:
            w.add_(0.1 * torch.randn_like(w))
    return weights


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _finetune(
    base: dict[str, torch.Tensor],
    base_vocab: dict[str, int],
    vocab: dict[str, int],
    rows: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The base plus small deltas, its vocabulary tensors re-indexed by token string:
    a token the base has keeps the base's row (plus a delta), another gets a new row."""
    gen = torch.Generator().manual_seed(seed)

    def delta(w: torch.Tensor) -> torch.Tensor:
        return 0.05 * float(w.std()) * torch.randn(w.shape, generator=gen)

    out = {k: w + delta(w) for k, w in base.items() if k not in VOCAB_TENSORS}
    for name in VOCAB_TENSORS:
        w = base[name]
        rows_out = 0.02 * torch.randn((rows, w.shape[1]), generator=gen)
        for token, i in vocab.items():
            if token in base_vocab:
                rows_out[i] = w[base_vocab[token]]
        out[name] = rows_out + delta(rows_out)
    return out


def _save(weights: dict[str, torch.Tensor], directory: Path) -> Path:
    """fp16 safetensors + config.json through transformers' save_pretrained."""
    from transformers import LlamaForCausalLM

    rows = weights["model.embed_tokens.weight"].shape[0]
    model = LlamaForCausalLM(llama_config(rows, HIDDEN, INTERMEDIATE, LAYERS))
    model.load_state_dict(weights)
    model.to(torch.float16).save_pretrained(directory)
    return directory
