"""Issue 17: mergekit configs as people publish them -- tokenizer sources (a model,
`base`, `union`), a `tokenizer:` block with per-token embedding sources, chat
templates -- through `mergekit-yaml` (mergekit 0.1.5, tests/mergekit_ref.py) and
through `lazymerge merge`, on tiny fp16 Llamas whose real tokenizers differ
(tests/tokenizer_fixtures.py).

What mergekit does there (mergekit/tokenizer/{build,embed}.py, merge.py):
- The output vocabulary is the source model's tokenizer, the base's (`base`), or the
  union: the base's tokenizer with every other model's missing tokens appended as
  *added* tokens (non-special, so matched as whole strings in text), then every added
  token of any model (the first model's settings win; the base comes first; one whose
  string is a plain token of the base keeps that id but becomes an added token).
- Each model's embed_tokens/lm_head rows are permuted to the output vocabulary by
  token string (padding rows past a tokenizer are dropped). A row a model lacks gets
  a default: the sole holder's row; else the base's; else the mean of the holders'.
  `tokens:` overrides that per token (`force: true` even for models that have it).
- config.json's vocab_size becomes the output vocabulary's size.
- `chat_template`: `auto` is the most common template of the inputs (stripped; ties go
  to the first model), a name is one of mergekit's templates, anything else with a `{`
  and 20+ characters is the template itself.

Compared: every tensor within 1 fp16 ulp; the tokenizers by meaning (vocabulary,
special and added tokens, encodings of sample text, chat templates by rendering:
lazymerge writes its own templates, not mergekit's files), config.json's vocab_size;
the output loads in transformers and runs. Bad configs are refused in one line before
anything is written.

Two of mergekit's orders are left to chance: its referenced_models() is a set (with no
base model its first member is the donor; it orders a union's models and `auto`'s
ties), and a union appends each model's new tokens in `get_vocab()` order, a Rust
HashMap's, seeded anew in every process. lazymerge takes the config's order (base, then
models) and each model's tokens by id; the harness gives mergekit those same orders
(run_many(ordered=True) says why no PYTHONHASHSEED can).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import error_of, run_cli, session_runs
from mergekit_ref import Mergekit, load_checkpoint, run_many
from test_mergekit_methods import ulps
from tokenizer_fixtures import CHATML, FINETUNE_TEMPLATE, THINK, Models, make_models

pytestmark = pytest.mark.mergekit

TEMPLATE_NAMES = ("alpaca", "chatml", "llama3", "mistral", "exaone")
LITERAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
    "{% if not loop.last %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}\n"
    "[ASSISTANT]{% endif %}"
)
NEW_TOKENS = ("<|tool|>", "<|pad|>", "<|copy|>")
FP32 = {"dtype": "float32", "out_dtype": "float16"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return make_models(tmp_path_factory.mktemp("tokenizer-models"))


# --- the configs ----------------------------------------------------------------------


def _entries(*weighted: tuple[Path, float]) -> list[dict[str, Any]]:
    return [{"model": str(p), "parameters": {"weight": w}} for p, w in weighted]


def linear(*weighted: tuple[Path, float], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "linear", "models": _entries(*weighted), "dtype": "float16"} | extra


def task_arithmetic(m: Models, method: str = "task_arithmetic", **extra: Any) -> dict[str, Any]:
    """The base and two fine-tunes with their own tokenizers (wide padded, chat with
    ChatML's tokens)."""
    entries = _entries((m.wide, 0.6), (m.chat, 0.5))
    if method == "ties":  # density 1: TIES' sign election, and no top-k threshold ties
        for e in entries:
            e["parameters"]["density"] = 1.0
    return {
        "merge_method": method,
        "base_model": str(m.base),
        "models": entries,
        "dtype": "float16",
    } | extra


def picks(m: Models) -> dict[str, str]:
    """Tokens the `tokens:` case overrides, chosen from the fixture's vocabularies."""
    base, wide, chat = (m.vocab(n) for n in ("base", "wide", "chat"))

    def plain(tokens: set[str]) -> list[str]:  # learned merges, not single bytes
        return sorted(t for t in tokens if len(t) > 1 and not t.startswith("<"))

    shared = plain(set(base) & set(wide) & set(chat))
    return {
        "shared_forced_wide": shared[0],
        "shared_forced_base": shared[1],
        "pair_from_chat": plain((set(wide) & set(chat)) - set(base))[0],
        "chat_only_from_wide_token": plain(set(chat) - set(base) - set(wide))[0],
        "wide_token": plain(set(wide) - set(chat))[0],
    }


def tokens_block(m: Models, source: str = "union") -> dict[str, Any]:
    p = picks(m)
    tokens: dict[str, Any] = {
        p["shared_forced_wide"]: {"source": str(m.wide), "force": True},
        p["shared_forced_base"]: {"source": str(m.base), "force": True},
        p["pair_from_chat"]: {"source": str(m.chat)},
        p["chat_only_from_wide_token"]: {
            "source": {"kind": "model_token", "model": str(m.wide), "token": p["wide_token"]}
        },
        NEW_TOKENS[0]: {
            "source": {"kind": "model_token", "model": str(m.base), "token": "<|eot_id|>"}
        },
        NEW_TOKENS[1]: {"source": {"kind": "zero"}},
        NEW_TOKENS[2]: {"source": {"kind": "model_token", "model": str(m.chat), "token_id": 105}},
    }
    return {"source": source, "tokens": tokens}


def plain_pair(m: Models, **extra: Any) -> dict[str, Any]:
    """No tokenizer source: the base and a fine-tune with its very tokenizer."""
    return linear((m.base, 0.5), (m.same1, 0.5), **extra)


def union_pair(m: Models, **extra: Any) -> dict[str, Any]:
    return linear((m.base, 0.5), (m.chat, 0.5), tokenizer_source="union", **extra)


def case_config(case: str, m: Models) -> dict[str, Any]:
    if case.startswith("template-"):  # template-<name>-<plain|union>
        _, name, kind = case.split("-")
        template = LITERAL_TEMPLATE if name == "literal" else name
        return (plain_pair if kind == "plain" else union_pair)(m, chat_template=template)
    return {
        "source-base": lambda: task_arithmetic(m, tokenizer_source="base"),
        "source-model": lambda: linear((m.wide, 0.3), (m.chat, 0.7), tokenizer_source=str(m.wide)),
        "union-pair": lambda: union_pair(m),
        "union-three": lambda: task_arithmetic(m, tokenizer_source="union"),
        "union-ties": lambda: task_arithmetic(m, "ties", tokenizer_source="union"),
        # Rows rounded up to a multiple of 64: each model's extra rows its aligned rows' mean.
        "union-pad": lambda: linear(
            (m.base, 0.5), (m.chat, 0.5), tokenizer={"source": "union", "pad_to_multiple_of": 64}
        ),
        # Computed in fp32 (the defaults' means too), one rounding to fp16 at the end.
        "tokens-union": lambda: task_arithmetic(m, tokenizer=tokens_block(m), **FP32),
        "tokens-model": lambda: task_arithmetic(m, tokenizer=tokens_block(m, str(m.chat)), **FP32),
        "auto-union": lambda: task_arithmetic(m, tokenizer_source="union", chat_template="auto"),
        "auto-plain": lambda: {
            "merge_method": "task_arithmetic",
            "base_model": str(m.base),
            "models": _entries((m.same1, 0.5), (m.same2, 0.5)),
            "dtype": "float16",
            "chat_template": "auto",
        },
        # Two templates, one model each: no base model, so the first model's wins.
        "auto-tie": lambda: linear((m.same1, 0.5), (m.base, 0.5), chat_template="auto"),
    }[case]()


def _template_cases() -> list[tuple[str, bool]]:
    """Each template once with a tokenizer source and once without; one of the two runs
    every time (alternating, so both paths always run), the other rotates."""
    cases = []
    for i, name in enumerate((*TEMPLATE_NAMES, "literal")):
        first, second = ("plain", "union") if i % 2 == 0 else ("union", "plain")
        cases += [(f"template-{name}-{first}", False), (f"template-{name}-{second}", True)]
    return cases


# case -> rotating?
CASES: dict[str, bool] = {
    "source-base": False,
    "source-model": False,
    "union-pair": False,
    "union-three": False,
    "union-ties": True,
    "union-pad": False,
    "tokens-union": False,
    "tokens-model": False,
    "auto-union": False,
    "auto-plain": False,
    "auto-tie": True,
    **dict(_template_cases()),
}
CASE_PARAMS = [
    pytest.param(c, id=c, marks=pytest.mark.rotating if rotating else ())
    for c, rotating in CASES.items()
]
# What the reference test below checks longhand.
LONGHAND = ("union-pair", "tokens-union")
# Cases whose template is kept byte for byte: auto's (stripped, as mergekit strips it),
# a literal's.
VERBATIM = {"auto-union": FINETUNE_TEMPLATE.strip(), "template-literal-plain": LITERAL_TEMPLATE}


@pytest.fixture(scope="module")
def mergekit_outputs(
    mergekit: Mergekit,
    models: Models,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> dict[str, Path]:
    """Every case this session compares, merged by mergekit in one process (run_many):
    its start-up (~6 s) is most of the cost. copy_tokenizer as mergekit-yaml has it by
    default: without a tokenizer source that is what writes a chat template."""
    wanted = {i.callspec.params["case"] for i in session_runs(request, test_matches_mergekit)}
    if session_runs(request, test_mergekit_reference_permutes_rows_by_token):
        wanted.update(LONGHAND)
    if session_runs(request, test_auto_and_literal_templates_are_byte_identical):
        wanted.update(VERBATIM)
    root = tmp_path_factory.mktemp("mergekit-tokenizers")
    jobs = {c: (case_config(c, models), root / c) for c in CASES if c in wanted}
    errors = run_many(mergekit, jobs, copy_tokenizer=True, ordered=True)
    failed = {c: e for c, e in errors.items() if e}
    assert not failed, failed
    return {c: root / c for c in jobs}


def run_lazymerge(cfg: dict[str, Any], tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "mergekit.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp / "lm-out"
    assert run_cli("merge", path, "-o", out) == 0
    return out


# --- comparing tokenizers by meaning --------------------------------------------------

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "ba ce?"}],
    [
        {"role": "system", "content": "  be brief.  "},
        {"role": "user", "content": "hello there 42"},
        {"role": "assistant", "content": "ce ba."},
        {"role": "user", "content": "and 7's?\n"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ho "}],
]
SAMPLES = (
    "hello there, 42's bacedo!",
    "<|begin_of_text|>ba ce<|eot_id|> do<|end_of_text|>",
    f"{CHATML[0]}user\nhi{CHATML[1]}\n{THINK} ok",
    f"{NEW_TOKENS[0]}x{NEW_TOKENS[1]} {NEW_TOKENS[2]}",
)


def _added(tok: Any) -> dict[int, tuple[object, ...]]:
    keys = ("content", "special", "lstrip", "rstrip", "single_word", "normalized")
    return {i: tuple(getattr(t, k) for k in keys) for i, t in tok.added_tokens_decoder.items()}


def _renderings(tok: Any) -> list[str] | None:
    if tok.chat_template is None:
        return None
    return [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
        for c in CONVERSATIONS
        for g in (False, True)
    ]


def assert_same_tokenizer(got_dir: Path, want_dir: Path, overlap: str) -> None:
    from transformers import AutoTokenizer

    got, want = AutoTokenizer.from_pretrained(got_dir), AutoTokenizer.from_pretrained(want_dir)
    assert got.get_vocab() == want.get_vocab()
    assert len(got) == len(want)
    assert _added(got) == _added(want)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "special_tokens_map"):
        assert getattr(got, attr) == getattr(want, attr), attr
    assert sorted(got.all_special_tokens) == sorted(want.all_special_tokens)
    for text in (*SAMPLES, f"x{overlap}y {overlap}"):
        ids = want.encode(text)
        assert got.encode(text) == ids, text
        assert got.decode(ids, skip_special_tokens=True) == want.decode(
            ids, skip_special_tokens=True
        )
    assert _renderings(got) == _renderings(want)


def template_of(out: Path) -> str | None:
    from transformers import AutoTokenizer

    template: str | None = AutoTokenizer.from_pretrained(out).chat_template
    return template


def assert_template_set(out: Path, base: Path) -> None:
    from transformers import AutoTokenizer

    rendered = _renderings(AutoTokenizer.from_pretrained(out))
    assert rendered is not None and rendered != _renderings(AutoTokenizer.from_pretrained(base))


def assert_runs_in_transformers(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.vocab_size >= len(tok)  # rows past the tokens: pad_to_multiple_of
    text = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False) if tok.chat_template else ""
    ids = tok(text + SAMPLES[0] + SAMPLES[3], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_mergekit(
    mergekit_outputs: dict[str, Path], models: Models, tmp_path: Path, case: str
) -> None:
    want_dir = mergekit_outputs[case]
    cfg = case_config(case, models)
    if "chat_template" in cfg:  # the reference did set one: not the donor's own
        assert_template_set(want_dir, models.base)
    got_dir = run_lazymerge(cfg, tmp_path)
    if cfg.get("chat_template") in ("auto", LITERAL_TEMPLATE):  # taken as they are
        assert template_of(got_dir) == template_of(want_dir)
    got_config = json.loads((got_dir / "config.json").read_text())
    want_config = json.loads((want_dir / "config.json").read_text())
    assert got_config["vocab_size"] == want_config["vocab_size"]
    assert (got_dir / "tokenizer.json").is_file() and (got_dir / "tokenizer_config.json").is_file()
    assert_same_tokenizer(got_dir, want_dir, models.overlap)  # first: rows follow it
    got, want = load_checkpoint(got_dir), load_checkpoint(want_dir)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        assert float(ulps(got[name], w).max()) <= 1.0, name
    assert_runs_in_transformers(got_dir)


def test_auto_and_literal_templates_are_byte_identical(
    mergekit_outputs: dict[str, Path], models: Models, tmp_path: Path
) -> None:
    """`auto` takes the most common input template as it is (stripped, as mergekit
    strips it); a literal is kept byte for byte."""
    for case, template in VERBATIM.items():
        assert template_of(mergekit_outputs[case]) == template
        out = run_lazymerge(case_config(case, models), tmp_path / case)
        assert template_of(out) == template, case


# --- the reference itself, longhand ---------------------------------------------------


def _rows(model: Path, name: str) -> tuple[dict[str, int], torch.Tensor]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model).get_vocab()
    return vocab, load_checkpoint(model)[name].float()


def test_mergekit_reference_permutes_rows_by_token(
    mergekit_outputs: dict[str, Path], models: Models
) -> None:
    """What the comparison above rests on, checked against mergekit's outputs without
    lazymerge: union ids (the base's, then the others' new tokens, then added tokens),
    rows moved by token string, and each default and `tokens:` source."""
    from transformers import AutoTokenizer

    name = "model.embed_tokens.weight"
    base_vocab, base = _rows(models.base, name)
    chat_vocab, chat = _rows(models.chat, name)
    wide_vocab, wide = _rows(models.wide, name)

    # union-pair: linear 0.5/0.5 of base and chat; a token one lacks takes the other's row.
    out = mergekit_outputs["union-pair"]
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    merged = load_checkpoint(out)[name].float()
    assert {t: vocab[t] for t in base_vocab} == base_vocab  # the base's ids kept
    new = sorted((t for t in chat_vocab if t not in base_vocab), key=chat_vocab.__getitem__)
    assert [vocab[t] for t in new] == list(range(len(base_vocab), len(vocab)))  # in id order
    assert len(vocab) == len(base_vocab) + len(new) == merged.shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)
    for token, i in vocab.items():
        b = base[base_vocab[token]] if token in base_vocab else chat[chat_vocab[token]]
        c = chat[chat_vocab[token]] if token in chat_vocab else b
        assert float(ulps(merged[i], 0.5 * b + 0.5 * c).max()) <= 1.0, token

    # tokens-union: task arithmetic over rows permuted with defaults and overrides.
    out = mergekit_outputs["tokens-union"]
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    merged = load_checkpoint(out)[name].float()
    p = picks(models)
    rows = {"base": (base_vocab, base), "wide": (wide_vocab, wide), "chat": (chat_vocab, chat)}
    assert max(wide_vocab.values()) < 100 < wide.shape[0]  # wide's padding rows dropped
    assert all(t in vocab for t in NEW_TOKENS)

    def row(model: str, token: str) -> torch.Tensor | None:
        v, r = rows[model]
        return r[v[token]] if token in v else None

    overrides = {
        p["shared_forced_wide"]: (row("wide", p["shared_forced_wide"]), True),
        p["shared_forced_base"]: (row("base", p["shared_forced_base"]), True),
        p["pair_from_chat"]: (row("chat", p["pair_from_chat"]), False),
        p["chat_only_from_wide_token"]: (row("wide", p["wide_token"]), False),
        NEW_TOKENS[0]: (row("base", "<|eot_id|>"), False),
        NEW_TOKENS[1]: (torch.zeros(base.shape[1]), False),
        NEW_TOKENS[2]: (chat[105], False),
    }
    for token, i in vocab.items():
        have = {k: row(k, token) for k in rows}
        default, force = overrides.get(token, (None, False))
        if default is None:
            holders = [r for r in have.values() if r is not None]
            default = have["base"] if have["base"] is not None else sum(holders) / len(holders)
        perm = {k: default if force or r is None else r for k, r in have.items()}
        base_row = perm["base"]
        want = base_row + 0.6 * (perm["wide"] - base_row) + 0.5 * (perm["chat"] - base_row)
        assert float(ulps(merged[i], want).max()) <= 1.0, token


# --- bad configs: refused in one line, nothing written --------------------------------


def _with_token(m: Models, token: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The `tokens-union` case with one `tokens:` entry: `token: entry`."""
    return task_arithmetic(m, tokenizer={"source": "union", "tokens": {token: entry}})


def _bad(m: Models, case: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A config mergekit refuses, and what lazymerge's one line must name. mergekit's
    error (0.1.5, checked with the fixture) follows each."""
    new, absent = NEW_TOKENS[0], picks(m)["wide_token"]  # absent: in wide, not in chat

    def model_token(model: Path, **which: object) -> dict[str, Any]:
        return {"source": {"kind": "model_token", "model": str(model), **which}}

    return {
        # OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name'
        "tokenizer_source-unknown": lambda: (
            task_arithmetic(m, tokenizer_source=str(m.base.parent / "nope")),
            ("tokenizer_source",),
        ),
        # ValueError: Token '<|tool|>' requires a vocabulary weight from model base
        # (`base` is a model path to mergekit; lazymerge reads it as the base model,
        # which has no row for this new token: refused too, naming the token)
        "tokens-source-unknown": lambda: (
            _with_token(m, new, {"source": "base"}),
            ("tokens", new),
        ),
        # ValueError: ... requires a vocabulary weight from model .../same1
        "tokens-model_token-unknown-model": lambda: (
            _with_token(m, new, model_token(m.same1, token="<|eot_id|>")),
            ("tokens", new),
        ),
        # RuntimeError: Invalid chat template: chatml2
        "chat_template-unknown-name": lambda: (
            union_pair(m, chat_template="chatml2"),
            ("chat_template", "chatml2"),
        ),
        # Without a tokenizer source mergekit only logs that error ("Failed to copy
        # tokenizer. The merge was still successful") and writes no tokenizer.
        "chat_template-unknown-name-plain": lambda: (
            plain_pair(m, chat_template="chatml2"),
            ("chat_template", "chatml2"),
        ),
        # RuntimeError: Cannot specify both tokenizer_source and tokenizer
        "tokenizer_source-and-tokenizer": lambda: (
            task_arithmetic(m, tokenizer_source="union", tokenizer=tokens_block(m)),
            ("tokenizer",),
        ),
        # AssertionError: Token 'adh' not found in model .../chat
        "tokens-model_token-absent-token": lambda: (
            _with_token(m, new, model_token(m.chat, token=absent)),
            ("tokens", new),
        ),
        # AssertionError: Token ID 4096 out of range for model .../chat
        "tokens-model_token-id-out-of-range": lambda: (
            _with_token(m, new, model_token(m.chat, token_id=4096)),
            ("tokens", new),
        ),
        # AssertionError: Token 'adh' not found in model .../chat
        "tokens-model-lacks-token": lambda: (
            _with_token(m, absent, {"source": str(m.chat)}),
            ("tokens", absent),
        ),
        # NotImplementedError: source=None force=False (a token some model lacks)
        "tokens-no-source": lambda: (_with_token(m, new, {}), ("tokens", new)),
    }[case]()


BAD = (
    "tokenizer_source-unknown",
    "tokens-source-unknown",
    "tokens-model_token-unknown-model",
    "chat_template-unknown-name",
    "chat_template-unknown-name-plain",
    "tokenizer_source-and-tokenizer",
    "tokens-model_token-absent-token",
    "tokens-model_token-id-out-of-range",
    "tokens-model-lacks-token",
    "tokens-no-source",
)


@pytest.mark.parametrize("case", BAD)
def test_bad_config_is_refused_in_one_line(
    models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    cfg, named = _bad(models, case)
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    err = error_of(capsys, "merge", path, "-o", out)
    for word in named:
        assert word in err, (word, err)
    assert not out.exists() or not any(out.iterdir())
