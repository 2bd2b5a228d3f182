"""The geometric methods' examples (lazymerge/examples/), run as written on a tiny Llama
family: each plans with its method and the passes its docs promise, merges into something
that is none of its inputs, and loads in transformers with every key where it belongs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_merged, run_cli
from mergekit_ref import Family, load_checkpoint, make_family
from test_nmodel_merge import localized_example

BIG = "model.layers.1.mlp.down_proj.weight"  # a 2-D tensor in every family


@dataclass(frozen=True)
class Case:
    example: str
    method: str
    layer_passes: str  # the plan table's passes cell on a decoder layer (" | " when 1-D differ)
    big_passes: int  # the plan's passes for BIG: 1 writing + the statistics passes


CASES = [
    Case("slerp-two-models.yaml", "slerp", "2", 2),  # Σa², Σb², Σab
    Case("nuslerp.yaml", "nuslerp", "1 | 3", 1),  # rows: none; a 1-D norm vector: 2
    Case("multislerp.yaml", "multislerp", "5", 5),  # norms, mean's norm, dots, tangent
    Case("karcher.yaml", "karcher", "21", 21),  # 2 + 3 * max_iter (6)
    Case("model-stock.yaml", "model_stock", "2", 2),  # one cosine per tensor
    Case("nearswap.yaml", "nearswap", "1", 1),  # elementwise
    Case("arcee-fusion.yaml", "arcee_fusion", "2 | 3", 3),  # fp32 quartiles: 2; 1-D: 1
]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("examples"), torch.float16, seed=7)


def placeholders(family: Family) -> dict[str, Path]:
    """The examples' model names -> the family: the base and three fine-tunes of it (no
    example names two that land on the same one)."""
    ft0, ft1, ft2 = family.finetunes
    return {"mistral-7b": family.base, "zephyr-7b": family.base, "hermes-7b": ft0,
            "neural-chat-7b": ft2, "metamath-7b": ft1, "codeninja-7b": ft2}  # fmt: skip


def plan_of(recipe: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    capsys.readouterr()
    assert run_cli("plan", recipe, *flags) == 0
    return capsys.readouterr().out


def layer_rows(plan: str) -> dict[str, list[str]]:
    """The method table's rows by layer ("0", ..., "rest"): their cells."""
    lines = plan.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer  "))
    rows = {}
    for line in lines[head + 1 :]:
        key = line[:5].strip()
        if not (key.isdigit() or key == "rest"):
            break
        rows[key] = [c.strip() for c in line[7:].split("  ") if c.strip()]
    return rows


def check_plan(
    recipe: Path, case: Case, family: Family, capsys: pytest.CaptureFixture[str]
) -> None:
    text = plan_of(recipe, capsys)
    assert text.startswith(f"method: {case.method}, float32 arithmetic"), text
    rows = layer_rows(text)
    n_layers = json.loads((family.base / "config.json").read_text())["num_hidden_layers"]
    assert set(rows) == {*map(str, range(n_layers)), "rest"}, text
    for layer, cells in rows.items():
        assert cells[-1] == case.layer_passes, (layer, cells)
    tensors = {t["name"]: t for t in json.loads(plan_of(recipe, capsys, "--json"))["tensors"]}
    assert tensors[BIG]["method"].split()[0] == case.method, tensors[BIG]["method"]
    assert tensors[BIG]["passes"] == case.big_passes


def differs(out: torch.Tensor, model: torch.Tensor) -> int:
    """Elements of `out` that are not `model`'s value rounded to out's dtype (a copy of
    `model` through the output dtype has none)."""
    return int((out != model.to(out.dtype)).sum())


@pytest.mark.parametrize("case", CASES, ids=[c.example for c in CASES])
def test_the_method_example_merges(
    case: Case, family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = localized_example(case.example, tmp_path, placeholders(family))
    text = recipe.read_text()
    assert not [line for line in text.splitlines() if "./" in line.split("#")[0]], text
    check_plan(recipe, case, family, capsys)

    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    got = load_merged(out)
    total = sum(t.numel() for t in got.values())
    for model in family.models:
        if str(model) not in text:
            continue
        weights = load_checkpoint(model)
        assert got.keys() == weights.keys()
        # a real merge: a good share of the elements is none of the inputs' values
        changed = sum(differs(got[k], weights[k]) for k in got)
        assert changed > 0.02 * total, f"{model.name}: {changed} of {total} differ"

    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32
    )
    model, info = loaded
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(torch.arange(16).reshape(2, 8)).logits
    assert bool(torch.isfinite(logits).all())


def test_slerp_example_follows_its_filtered_gradient(family: Family, tmp_path: Path) -> None:
    """t's anchors reach their ends at the first and last layers: attention starts as the
    base (t = 0) and ends as the other model (t = 1), the MLPs the other way round; a
    layer norm (no filter matches it) is halfway, neither."""
    recipe = localized_example("slerp-two-models.yaml", tmp_path, placeholders(family))
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    got = load_merged(tmp_path / "out")
    ft0, _, ft2 = family.finetunes
    base, other = load_checkpoint(ft0), load_checkpoint(ft2)  # hermes, neural-chat
    last = json.loads((family.base / "config.json").read_text())["num_hidden_layers"] - 1
    for layer, attn, mlp in ((0, base, other), (last, other, base)):
        for name, want in (("self_attn.q_proj", attn), ("mlp.up_proj", mlp)):
            key = f"model.layers.{layer}.{name}.weight"
            # one bf16 rounding of a fp32 slerp whose coefficients are 1 and 0 to fp32
            torch.testing.assert_close(
                got[key].float(), want[key].to(torch.bfloat16).float(), rtol=2**-8, atol=0,
                msg=key,
            )  # fmt: skip
    norm = "model.layers.0.input_layernorm.weight"
    assert differs(got[norm], base[norm]) and differs(got[norm], other[norm])


def test_arcee_fusion_example_takes_each_element_from_one_model(
    family: Family, tmp_path: Path
) -> None:
    """arcee_fusion keeps the base's value or takes the other model's, element by element
    (b + (x - b)·M in fp32, M a 0/1 mask), and takes the other's where it is an outlier:
    some, not most."""
    recipe = localized_example("arcee-fusion.yaml", tmp_path, placeholders(family))
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    got = load_merged(tmp_path / "out")
    base, other = load_checkpoint(family.base), load_checkpoint(family.finetunes[0])
    taken = moved = 0
    for k, out in got.items():
        b, x = base[k].to(out.dtype), other[k].to(out.dtype)
        assert bool(((out == b) | (out == x)).all()), k
        taken += int(((out == x) & (x != b)).sum())
        moved += int((x != b).sum())
    assert 0 < taken < 0.5 * moved, (taken, moved)
