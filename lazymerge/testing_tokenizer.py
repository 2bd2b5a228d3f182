"""Fixture code: a tiny Llama-style tokenizer, trained here in milliseconds, so a test
model can carry a real Hugging Face tokenizer (and a GGUF written from it, which llama.cpp
will not load without one) without downloading anything. Not part of the merge.

Two styles, the two Llama tokenizers llama.cpp and transformers' GGUF loader both read:

- "bpe" (Llama 3): byte-level BPE split by Llama 3's regex, `ignore_merges` as Llama 3
  has it; in a GGUF `tokenizer.ggml.model = gpt2`, `pre = llama-bpe`, merges stored. It
  fits any vocabulary from 64 tokens up: only the bytes of its small alphabet are in it.
- "spm" (Llama 2, Mistral 7B): sentencepiece-style BPE with `▁` for spaces and byte
  fallback; in a GGUF `tokenizer.ggml.model = llama`. Its 256 `<0xNN>` byte tokens
  (llama.cpp looks bytes up there) need a vocabulary of at least 320.

Both are trained (a Llama 2-sized 32000 in about 2 s, a test's 96 in 20 ms) on seeded
nonsense words over a small alphabet (lower-case letters, digits, `.,'!?`, space and
newline); text outside it does not round-trip.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

Style = Literal["bpe", "spm"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALPHABET = LETTERS + "0123456789.,'!? \n"
# Llama 3's pre-tokenizer regex, as its tokenizer.json spells it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS: dict[Style, tuple[str, str, str]] = {  # bos, eos, and the third each style has
    "bpe": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "spm": ("<s>", "</s>", "<unk>"),
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
MIN_VOCAB: dict[Style, int] = {"bpe": 64, "spm": 320}


def write_tokenizer(directory: Path, vocab: int, seed: int = 0, style: Style = "bpe") -> None:
    """Train a tokenizer of exactly `vocab` tokens and save it in `directory` as
    tokenizer.json, tokenizer_config.json (with a chat template) and
    special_tokens_map.json, as transformers saves a Llama's.

    Example:
        >>> write_tokenizer(tmp_path, 96)  # then AutoTokenizer.from_pretrained(tmp_path)
    """
    if vocab < MIN_VOCAB[style]:
        raise ValueError(f"a {style!r} tokenizer needs a vocabulary of {MIN_VOCAB[style]}+")
    tokenizer = _bpe(vocab, seed) if style == "bpe" else _spm(vocab, seed)
    if tokenizer.get_vocab_size() != vocab:  # the corpus ran out of pairs to merge
        raise ValueError(f"trained {tokenizer.get_vocab_size()} tokens, not {vocab}")
    bos, eos, _ = SPECIALS[style]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A $B:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": bos, "eos_token": eos}
    if style == "spm":
        specials["unk_token"] = SPECIALS["spm"][2]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": _added_tokens(tokenizer),
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def _bpe(vocab: int, seed: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # The bytes of our alphabet as byte-level BPE spells them (" " is "Ġ").
    alphabet = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    spelled = list(alphabet.pre_tokenize_str(ALPHABET)[0][0])
    trainer = BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIALS["bpe"]),
        initial_alphabet=spelled,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed, max(400, vocab)), trainer)
    return tokenizer


def _spm(vocab: int, seed: int) -> Tokenizer:
    unk = SPECIALS["spm"][2]
    tokenizer = Tokenizer(models.BPE(unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Words are trained apart (split), so no merge spans a "▁"; then the whole text is
    # one piece at use, as Llama 2's tokenizer.json (and llama.cpp) take it.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = BpeTrainer(
        vocab_size=vocab,
        special_tokens=[unk, *SPECIALS["spm"][:2], *bytes_],
        initial_alphabet=["▁", *ALPHABET.replace(" ", "").replace("\n", "")],
        show_progress=False,
    )
    # No "\n" piece: a newline goes through byte fallback, <0x0A>, as in Llama 2.
    tokenizer.train_from_iterator([line.strip() for line in corpus(seed, vocab)], trainer)
    # The byte tokens were special only to give them ids 3..258, as Llama 2's have; in
    # its tokenizer.json they are plain vocabulary, not added tokens.
    saved = json.loads(tokenizer.to_str())
    saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] not in bytes_]
    tokenizer = Tokenizer.from_str(json.dumps(saved))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return tokenizer


def corpus(seed: int, size: int = 1000) -> list[str]:
    """Seeded nonsense: `size` lines of words of a few hundred syllables, with pairs
    enough to merge for a vocabulary of about 2 * `size`."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiouy"]
    syllables += [a + b + c for a, b, c in zip(LETTERS, LETTERS[3:], LETTERS[7:], strict=False)]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(size)]
    lines = []
    for _ in range(size):
        line = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        lines.append(line + rng.choice(".,!?") + f" {rng.randint(0, 999)}'s\n")
    return lines


def _added_tokens(tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`, as transformers writes it."""
    decoder = tokenizer.get_added_tokens_decoder()
    return {str(i): _added(t) for i, t in sorted(decoder.items())}


def _added(t: AddedToken) -> dict[str, Any]:
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {k: getattr(t, k) for k in keys}
