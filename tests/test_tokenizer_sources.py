"""Tokenizer sources and chat templates, lazymerge's side: the row alignment worked out
by hand on named tokens, the fast path (same tokenizers: rows as they are, same bytes),
what `plan` and the card say, and bad input in one line with nothing written. The
comparison with mergekit itself is tests/test_mergekit_tokenizers.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.plan import build_plan
from lazymerge.recipe import load_recipe, parse_recipe
from lazymerge.run.budget import estimate_peak
from lazymerge.testing import LlamaShape, write_llama, write_lora
from lazymerge.testing_tokenizer import write_tokenizer

from conftest import run_cli

SHAPE = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4)


def model(root: Path, name: str, vocab: int, seed: int, tok_seed: int | None = None) -> Path:
    d = root / name
    write_tokenizer(d, vocab, seed=seed if tok_seed is None else tok_seed)
    write_llama(d, LlamaShape(**SHAPE, vocab=vocab), seed=seed, dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "base": model(root, "base", 300, 1),
        "other": model(root, "other", 320, 2),  # another tokenizer: overlapping vocabularies
        "twin": model(root, "twin", 300, 3, tok_seed=1),  # the base's tokenizer, other weights
    }


def config(models: dict[str, Path], second: str = "other", **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["base"]), "parameters": {"weight": 0.25}},
            {"model": str(models[second]), "parameters": {"weight": 0.75}},
        ],
        "dtype": "float32",
    } | extra


def merge(cfg: dict[str, Any], tmp_path: Path) -> tuple[int, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    return run_cli("merge", path, "-o", out), out


def vocab(directory: Path) -> dict[str, int]:
    data = json.loads((directory / "tokenizer.json").read_text())
    ids = dict(data["model"]["vocab"])
    return ids | {t["content"]: t["id"] for t in data["added_tokens"]}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_union_rows_follow_mergekits_rules_token_by_token(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Each output token's embedding row, computed here longhand from the two models'
    rows by the rules mergekit's PermutedVocabulary states: both have it -> the weighted
    sum of their rows; one has it -> that model's row stands in for the other's."""
    rc, out = merge(config(models, tokenizer_source="union"), tmp_path)
    assert rc == 0
    base_v, other_v, out_v = vocab(models["base"]), vocab(models["other"]), vocab(out)
    assert set(out_v) == set(base_v) | set(other_v)
    assert all(out_v[t] == i for t, i in base_v.items())  # the base's ids stay
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(out_v)
    b, o = weights(models["base"]), weights(models["other"])
    got = weights(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape[0] == len(out_v)
        for token, i in out_v.items():
            rb = b[name][base_v[token]] if token in base_v else None
            ro = o[name][other_v[token]] if token in other_v else None
            rb = ro if rb is None else rb
            ro = rb if ro is None else ro
            assert rb is not None and ro is not None
            want = 0.25 * rb + 0.75 * ro
            torch.testing.assert_close(got[name][i], want, rtol=0, atol=1e-6)


def test_same_tokenizers_read_rows_as_they_are(models: dict[str, Path], tmp_path: Path) -> None:
    """tokenizer_source: base over models sharing the base's tokenizer: no row is moved,
    and the bytes are those of the merge without a tokenizer source."""
    cfg = config(models, second="twin", tokenizer_source="base")
    plan = build_plan(parse_recipe(cfg, tmp_path))
    assert all(i.gather is None for t in plan.tensors for i in t.inputs)
    rc, out = merge(cfg, tmp_path / "with")
    rc2, plain = merge(config(models, second="twin"), tmp_path / "without")
    assert rc == rc2 == 0
    a, b = weights(out), weights(plain)
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_tokens_rules_and_force(models: dict[str, Path], tmp_path: Path) -> None:
    """A `tokens:` rule: zero for a new token, another token's row, and `force` making a
    token both models have take one model's row."""
    base_v, other_v = vocab(models["base"]), vocab(models["other"])
    shared = next(t for t in base_v if t in other_v and base_v[t] != other_v[t] and t.isalpha())
    donor = next(t for t in other_v if t not in base_v and t.isalpha())
    tokens = {
        "<new>": {"source": {"kind": "zero"}},
        "<copy>": {
            "source": {"kind": "model_token", "model": str(models["other"]), "token": donor}
        },
        shared: {"source": str(models["other"]), "force": True},
    }
    cfg = config(models, tokenizer={"source": "base", "tokens": tokens})
    rc, out = merge(cfg, tmp_path)
    assert rc == 0
    out_v, got = vocab(out), weights(out)
    o = weights(models["other"])["model.embed_tokens.weight"]
    embed = got["model.embed_tokens.weight"]
    assert out_v["<new>"] == len(base_v) and out_v["<copy>"] == len(base_v) + 1
    assert torch.equal(embed[out_v["<new>"]], torch.zeros(SHAPE["hidden"]))
    torch.testing.assert_close(embed[out_v["<copy>"]], o[other_v[donor]], rtol=0, atol=1e-6)
    torch.testing.assert_close(embed[out_v[shared]], o[other_v[shared]], rtol=0, atol=1e-6)


def test_plan_and_card_say_which_tokenizer_and_template(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(models, tokenizer_source="union", chat_template="chatml")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("plan", path) == 0
    text = capsys.readouterr().out
    added = len(set(vocab(models["base"])) | set(vocab(models["other"]))) - 300
    assert f"tokenizer: the union of the models' vocabularies, {300 + added} tokens" in text
    assert f"({added} added to the base's)" in text
    assert "models[1]: vocabulary rows aligned by token" in text
    assert "chat template: chatml (built-in)" in text
    rc, out = merge(cfg, tmp_path)
    assert rc == 0
    card = (out / "README.md").read_text()
    assert "chat template: chatml (built-in)" in card
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in saved["chat_template"]


def test_auto_template_is_the_most_common(models: dict[str, Path], tmp_path: Path) -> None:
    """`auto`: the template most of the inputs have (three of five here), not the base's."""
    theirs = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    twins = {}
    for name in ("t1", "t2", "t3"):
        twins[name] = shutil.copytree(models["twin"], tmp_path / name)
        cfg_file = twins[name] / "tokenizer_config.json"
        data = json.loads(cfg_file.read_text())
        cfg_file.write_text(json.dumps(data | {"chat_template": theirs}))
    cfg = config(models, second="twin", chat_template="auto")
    cfg["models"] += [{"model": str(p), "parameters": {"weight": 0.1}} for p in twins.values()]
    rc, out = merge(cfg, tmp_path / "m")
    assert rc == 0
    base_cfg = json.loads((models["base"] / "tokenizer_config.json").read_text())
    assert base_cfg["chat_template"] != theirs
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == theirs
    assert (
        "chat template: auto, the inputs' most common: Jinja text"
        in (out / "README.md").read_text()
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tokenizer_source": "T"}, "is not a model of this config"),
        ({"chat_template": "vicuna"}, "chat_template: 'vicuna' is neither a built-in"),
        (
            {"tokenizer": {"source": "union", "tokens": {"x": {"source": {"kind": "model_token", "model": "M", "token": "<nope>"}}}}},
            "has no row for token '<nope>'",
        ),
    ],
)  # fmt: skip
def test_bad_tokenizer_config_is_one_line_and_writes_nothing(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    expected: str,
) -> None:
    text = json.dumps(change).replace('"M"', json.dumps(str(models["other"])))
    text = text.replace('"T"', json.dumps(str(models["twin"])))
    rc, out = merge(config(models, **json.loads(text)), tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_a_model_without_tokenizer_json_is_one_line(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    write_llama(bare, LlamaShape(**SHAPE, vocab=320), seed=9, dtype=torch.float32)
    cfg = config(models | {"other": bare}, tokenizer_source="union")
    rc, out = merge(cfg, tmp_path / "m")
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "has no tokenizer.json" in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_an_adapter_on_realigned_rows_is_refused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = write_lora(
        tmp_path / "lora", LlamaShape(**SHAPE, vocab=320), seed=4, targets=("lm_head",)
    )
    cfg = config(models, tokenizer_source="union")
    cfg["models"][1]["model"] = f"{models['other']}+{lora}"
    rc, out = merge(cfg, tmp_path / "m")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "realigns by token" in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
@pytest.mark.rotating  # ~15 s; like the slerp and GGUF peaks in test_memory.py
def test_union_streams_the_vocabulary_rows_within_the_budget(tmp_path: Path) -> None:
    """Rows read by token are gathered block by block from the maps: a union whose
    embeddings are 2 x 94 MB in fp32 stays far below one whole tensor at --max-memory
    32MiB (the child's own peak, VmHWM, against the bare interpreter's)."""
    from test_memory import PEAK, child_peak

    wide = dict(SHAPE, hidden=4096, intermediate=256)
    for k, (name, size) in enumerate((("a", 3000), ("b", 3200))):
        write_tokenizer(tmp_path / name, size, seed=k + 1)
        write_llama(tmp_path / name, LlamaShape(**wide, vocab=size), seed=k, dtype=torch.float16)
    cfg = config({"base": tmp_path / "a", "other": tmp_path / "b"}, tokenizer_source="union")
    cfg["dtype"] = "float16"
    (tmp_path / "union.yml").write_text(yaml.safe_dump(cfg))
    args = ["merge", str(tmp_path / "union.yml"), "-o", str(tmp_path / "out"), "-q"]
    args += ["--max-memory", "32MiB"]
    idle = child_peak(f"import lazymerge.cli, lazymerge.run.merge, torch; {PEAK}")
    peak = child_peak(f"from lazymerge.cli import main; assert main({args!r}) == 0; {PEAK}")
    rows = len(vocab(tmp_path / "out"))
    assert rows > 5000  # the union really is wider than either model
    whole = rows * 4096 * 4  # one embedding in fp32: what holding a tensor would take
    planned = estimate_peak(build_plan(load_recipe(tmp_path / "union.yml")), 32 * 2**20)
    report = f"idle {idle >> 20} MiB, union {peak >> 20} MiB, planned {planned >> 20} MiB"
    assert peak < planned + 32 * 2**20 < idle + whole, report  # test_memory.py's tolerance


def test_the_recorded_recipe_reads_back_the_same(models: dict[str, Path], tmp_path: Path) -> None:
    """The manifest and the card record `Recipe.to_dict()`: its tokenizer block and
    template parse back to the same recipe (a resume compares them)."""
    tokens = {
        "<x>": {"source": {"kind": "zero"}},
        "<y>": {"source": {"kind": "model_token", "model": str(models["other"]), "token_id": 5}, "force": True},
        "the": {"source": str(models["other"])},
    }  # fmt: skip
    for extra in (
        {
            "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 64},
            "chat_template": "auto",
        },
        {"tokenizer_source": str(models["other"]), "chat_template": "llama3"},
    ):
        recipe = parse_recipe(config(models, **extra), tmp_path)
        again = parse_recipe(recipe.to_dict(), Path("/"))
        assert again.tokenizer == recipe.tokenizer is not None
        assert again.chat_template == recipe.chat_template is not None


def test_an_added_token_with_other_settings_is_said_in_the_plan(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mergekit keeps the first model's settings for a token models add differently and
    only logs it; the plan says it."""
    other = shutil.copytree(models["other"], tmp_path / "other")
    data = json.loads((other / "tokenizer.json").read_text())
    token = data["added_tokens"][-1]
    token["rstrip"] = not token["rstrip"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    cfg = config(models | {"other": other}, tokenizer_source="union")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("plan", path) == 0
    text = capsys.readouterr().out
    assert f"tokenizer: {token['content']!r} is added with other settings by {other}" in text
    cfg["tokenizer_source"] = "base"  # only a union merges added tokens
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("plan", path) == 0
    assert "added with other settings" not in capsys.readouterr().out
