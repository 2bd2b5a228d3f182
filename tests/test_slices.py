"""Slices and layer surgery (issue 21): mergekit's `slices:` through `mergekit-yaml`
(mergekit 0.1.5, tests/mergekit_ref.py) and through `lazymerge merge`, on tiny random
4-layer Llamas: frankenmerges (more layers than the inputs, a layer repeated), blended
slices with `t` gradients per slice, per-source parameters, base-less nuslerp and
multislerp. Within 1 fp16 ulp of mergekit (passthrough: bit for bit); the output loads
in transformers with the output's layer count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import error_of, run_cli, session_runs
from mergekit_ref import Family, Mergekit, load_checkpoint, make_family, merge_all
from test_mergekit_methods import SUMS, dtype_ulps, ulps

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
T_GRADIENTS = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, Family]:
    root = tmp_path_factory.mktemp("slices")
    return {dtype: make_family(root, dtype, seed=5) for dtype in DTYPES}


def src(model: Path, start: int, end: int, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(model), "layer_range": [start, end]}
    return entry | ({"parameters": params} if params else {})


def case(family: Family, name: str) -> dict[str, Any]:
    """The mergekit config of case `name` on `family`."""
    base, ft0, ft1, _ = family.models
    dtype = DTYPES[family.dtype]
    cases: dict[str, dict[str, Any]] = {
        # two 4-layer models stacked into 6 layers, as frankenmerges are
        "frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [src(base, 0, 3)]}, {"sources": [src(ft0, 1, 4)]}]},
        # layer 1 of the base twice (and a scaled slice: computed, not copied)
        "repeat": {"merge_method": "passthrough", "slices": [
            {"sources": [src(base, 0, 2)]}, {"sources": [src(base, 1, 3)]},
            {"sources": [src(ft1, 3, 4, scale=0.5)]}]},
        # the Hub's most common config: slerp over every layer, t by filter and layer
        "slerp": {"merge_method": "slerp", "base_model": str(base),
                  "parameters": {"t": T_GRADIENTS}, "slices": [
            {"sources": [src(base, 0, 4), src(ft0, 0, 4)]}]},
        # two blended slices, each its own t gradient over its own layers, one of them
        # with its own base
        "slerp-two-slices": {"merge_method": "slerp", "base_model": str(base), "slices": [
            {"sources": [src(base, 0, 2), src(ft0, 0, 2)], "parameters": {"t": [0.1, 0.9]}},
            {"sources": [src(ft1, 2, 4), src(ft0, 2, 4)], "base_model": str(ft1),
             "parameters": {"t": [{"filter": "mlp", "value": 0.25}, {"value": [1, 0]}]}}]},
        # per-source weights, a filter, a slice's own parameters
        "linear-slices": {"merge_method": "linear", "slices": [
            {"sources": [src(base, 0, 2, weight=0.7), src(ft0, 1, 3, weight=0.3)]},
            {"sources": [src(ft1, 1, 4, weight=[{"filter": "mlp", "value": 0.2}, {"value": 0.6}]),
                         src(ft0, 0, 3, weight=0.5)], "parameters": {"normalize": False}}]},
        "task-arithmetic-slices": {"merge_method": "task_arithmetic", "base_model": str(base),
            "slices": [{"sources": [src(base, 0, 4), src(ft0, 0, 4, weight=0.6),
                                    src(ft1, 0, 4, weight=[0.2, 0.8])]}]},
        # base-less: the models themselves interpolated
        "nuslerp-no-base": {"merge_method": "nuslerp", "models": [
            {"model": str(ft0), "parameters": {"weight": 0.3}},
            {"model": str(ft1), "parameters": {"weight": 0.7}}]},
        # arcee_fusion's result is float32 (its mask is): mergekit writes that without
        # an out_dtype
        "arcee-fusion-float32": {"merge_method": "arcee_fusion", "base_model": str(base),
                                 "models": [{"model": str(base)}, {"model": str(ft0)}]},
        "multislerp-no-base": {"merge_method": "multislerp", "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in ((base, 0.2), (ft0, 0.5), (ft1, 0.3))]},
    }  # fmt: skip
    return cases[name] | {"dtype": dtype}


CASES = [
    "frankenmerge",
    "repeat",
    "slerp",
    "slerp-two-slices",
    "linear-slices",
    "task-arithmetic-slices",
    "nuslerp-no-base",
    "multislerp-no-base",
    "arcee-fusion-float32",
]
PAIRS = [(c, d) for c in CASES for d in DTYPES]
# Every case runs in fp16 on every run; its bf16 twin is a rotating cross-check
# (tests/conftest.py): one slice of them per run, all with LAZYMERGE_ALL_TESTS=1.
PAIR_PARAMS = [
    pytest.param(
        c, d, id=f"{c}-{DTYPES[d]}", marks=pytest.mark.rotating if d == torch.bfloat16 else ()
    )
    for c, d in PAIRS
]


@pytest.fixture(scope="module")
def mergekit_outputs(
    mergekit: Mergekit,
    families: dict[torch.dtype, Family],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> dict[tuple[str, torch.dtype], Path]:
    """Every case this session compares (and the frankenmerge the logits test loads),
    merged by mergekit in one process of its venv."""
    runs = session_runs(request, test_slices_match_mergekit)
    wanted = {(item.callspec.params["name"], item.callspec.params["dtype"]) for item in runs}
    if session_runs(request, test_frankenmerge_loads_in_transformers_as_mergekits):
        wanted.add(("frankenmerge", torch.float16))
    configs = {(c, d): case(families[d], c) for c, d in PAIRS if (c, d) in wanted}
    return merge_all(mergekit, tmp_path_factory.mktemp("slices-mergekit"), configs)


def merge(cfg: dict[str, Any], tmp: Path, *flags: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "slices.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp / "lm-out"
    assert run_cli("merge", path, "-o", out, "-q", *flags) == 0
    return out


@pytest.mark.mergekit
@pytest.mark.parametrize(("name", "dtype"), PAIR_PARAMS)
def test_slices_match_mergekit(
    mergekit_outputs: dict[tuple[str, torch.dtype], Path],
    families: dict[torch.dtype, Family],
    tmp_path: Path,
    name: str,
    dtype: torch.dtype,
) -> None:
    mk = mergekit_outputs[name, dtype]
    out = merge(case(families[dtype], name), tmp_path)
    got, want = load_checkpoint(out), load_checkpoint(mk)
    assert set(got) == set(want)
    sums = SUMS["slerp"] if "slerp" in name else 0
    for key, w in want.items():
        assert got[key].dtype == w.dtype, key
        off = ulps(got[key], w)
        if name in ("frankenmerge", "repeat"):
            assert torch.equal(got[key], w), key  # a copy (or a scale) is exact
        # whole-tensor float32 sums (slerp's norms): a few elements 1 ulp of the dtype off
        rounding = (dtype_ulps(got[key], w) <= sums) & (off > 1) if sums else off < 0
        assert float(off[~rounding].max()) <= 1.0, f"{name} {key}"
        assert int(rounding.sum()) <= 0.01 * w.numel(), f"{name} {key}"
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, mk))
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]


@pytest.mark.mergekit
def test_frankenmerge_loads_in_transformers_as_mergekits(
    mergekit_outputs: dict[tuple[str, torch.dtype], Path],
    families: dict[torch.dtype, Family],
    tmp_path: Path,
) -> None:
    """6 layers out of two 4-layer models: the same logits as mergekit's output."""
    from transformers import AutoModelForCausalLM

    out = merge(case(families[torch.float16], "frankenmerge"), tmp_path)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    logits = []
    for d in (out, mergekit_outputs["frankenmerge", torch.float16]):
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        assert not any(info.values()), info
        assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
        logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def plan_text(cfg: dict[str, Any], tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp / "plan.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    assert run_cli("plan", path) == 0
    return capsys.readouterr().out


def test_plan_shows_which_source_layer_becomes_which(
    families: dict[torch.dtype, Family], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    family = families[torch.float16]
    text = plan_text(case(family, "repeat"), tmp_path, capsys)
    base, ft1 = family.base.name, family.finetunes[1].name
    assert f"slices[0]: layers 0-1 <- {base} 0-1" in text
    assert f"slices[1]: layers 2-3 <- {base} 1-2" in text
    assert f"slices[2]: layers 4 <- {ft1} 3" in text
    rows = {
        line.split()[0]: line.split()[1] for line in text.splitlines() if line[:5].strip().isdigit()
    }
    assert rows == {"0": "models[0]:0", "1": "models[0]:1", "2": "models[0]:1",
                    "3": "models[0]:2", "4": "models[1]:3"}  # fmt: skip
    # 4 layers of 9 tensors and the embeddings copied; the scaled layer computed, and so
    # are the final norm and head: they come from the last slice, scale and all (mergekit)
    assert "tensors: 48 (11 computed, 37 copied as they are)" in text
    text = plan_text(case(family, "slerp-two-slices"), tmp_path, capsys)
    assert "slices[1]: layers 2-3 <- slerp of " in text


def test_native_slices_equal_the_mergekit_config(
    families: dict[torch.dtype, Family], tmp_path: Path
) -> None:
    """The native syntax (layers, base, models with LoRAs) means the same merge."""
    family = families[torch.bfloat16]
    cfg = case(family, "slerp-two-slices")
    native = {
        "method": "slerp",
        "base": cfg["base_model"],
        "compute": "bfloat16",
        "slices": [
            {
                "sources": [
                    {"model": s["model"], "layers": s["layer_range"]} for s in piece["sources"]
                ],
                "parameters": piece["parameters"],
            }
            | ({"base": piece["base_model"]} if "base_model" in piece else {})
            for piece in cfg["slices"]
        ],
    }
    a = load_checkpoint(merge(cfg, tmp_path / "a"))
    b = load_checkpoint(merge(native, tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sliced_merge_is_the_same_at_any_memory_and_verifies(
    families: dict[torch.dtype, Family], tmp_path: Path
) -> None:
    cfg = case(families[torch.float16], "slerp-two-slices")
    wide = merge(cfg, tmp_path / "wide")
    narrow = merge(cfg, tmp_path / "narrow", "--max-memory", "1KiB", "--shard-size", "20KB")
    a, b = load_checkpoint(wide), load_checkpoint(narrow)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_cli("verify", narrow) == 0


def test_per_layer_config_lists_follow_the_output_layers(
    families: dict[torch.dtype, Family], tmp_path: Path
) -> None:
    family = families[torch.float16]
    for k, model in enumerate(family.models[:2]):
        config = json.loads((model / "config.json").read_text())
        config["layer_types"] = [f"{'ab'[k]}{i}" for i in range(4)]
        (tmp_path / f"m{k}").mkdir()
        for f in model.iterdir():
            (tmp_path / f"m{k}" / f.name).symlink_to(f)
        (tmp_path / f"m{k}" / "config.json").unlink()
        (tmp_path / f"m{k}" / "config.json").write_text(json.dumps(config))
    cfg = {"merge_method": "passthrough", "dtype": "float16", "slices": [
        {"sources": [src(tmp_path / "m0", 0, 3)]}, {"sources": [src(tmp_path / "m1", 1, 4)]}]}  # fmt: skip
    out = json.loads((merge(cfg, tmp_path) / "config.json").read_text())
    assert out["num_hidden_layers"] == 6
    assert out["layer_types"] == ["a0", "a1", "a2", "b1", "b2", "b3"]


BAD = [
    ({"parameters": {"t": 1.5}}, "slerp", "t 1.5 is outside [0, 1]"),
    ({"layer_range": [2, 9]}, "frankenmerge", "layers [2, 9) reach past"),
    ({"layer_range": [3, 1]}, "frankenmerge", "is not a span"),
    ({"length": True}, "slerp", "every source of a slice gives it the same number of layers"),
    ({"two": True}, "frankenmerge", "passthrough merges exactly 1 model"),
    ({"three": True}, "slerp", "slerp merges exactly 2 models"),
    ({"no_base": True}, "slerp", "the base"),
    ({"residual_weight": 0.5}, "slerp", "unknown key 'residual_weight'"),
]


def bad_config(family: Family, change: dict[str, Any], name: str) -> dict[str, Any]:
    cfg = case(family, name)
    first = cfg["slices"][-1]["sources"]
    if "layer_range" in change:
        first[0]["layer_range"] = change["layer_range"]
    if "parameters" in change:
        cfg["parameters"] = change["parameters"]
    if "length" in change:
        first[1]["layer_range"] = [0, 3]
    if "two" in change:
        first.append(src(family.base, 0, 3))
    if "three" in change:
        first.append(src(family.finetunes[2], 0, 4))
    if "no_base" in change:
        first.pop(0)
        first.append(src(family.finetunes[2], 0, 4))
    if "residual_weight" in change:
        cfg["slices"][0]["residual_weight"] = 0.5
    return cfg


@pytest.mark.parametrize(("change", "name", "expected"), BAD)
def test_bad_slices_are_one_line_and_write_nothing(
    families: dict[torch.dtype, Family],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    name: str,
    expected: str,
) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad_config(families[torch.float16], change, name)))
    err = error_of(capsys, "merge", path, "-o", tmp_path / "out")
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("example", "layers"), [("mergekit-frankenmerge.yaml", 48), ("mergekit-slerp.yaml", 32)]
)
def test_the_slice_examples_run(tmp_path: Path, example: str, layers: int) -> None:
    """The examples as written, on 32-layer toy models (paths swapped for them)."""
    from lazymerge.testing import LlamaShape, write_llama

    from test_nmodel_merge import localized_example

    shape = LlamaShape(layers=32, hidden=16, intermediate=32, vocab=64, heads=2, kv_heads=1)
    models = {
        name: write_llama(tmp_path / name, shape=shape, seed=k, dtype=torch.bfloat16)
        for k, name in enumerate(("openhermes-7b", "neural-chat-7b"))
    }
    recipe = localized_example(example, tmp_path, models)
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    names = load_checkpoint(out)
    assert f"model.layers.{layers - 1}.mlp.down_proj.weight" in names
    assert f"model.layers.{layers}.mlp.down_proj.weight" not in names


def test_plot_draws_each_output_layers_sources_and_t(
    families: dict[torch.dtype, Family], tmp_path: Path
) -> None:
    """The picture of layer surgery: per output layer, its sources (model, layer); a
    slerp's t per layer; no SCE note where a method simply has no weight."""
    from lazymerge.plan import build_plan
    from lazymerge.recipe.parse import load_recipe
    from lazymerge.views.plot import share_picture

    family = families[torch.float16]
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(case(family, "repeat")))
    rows = share_picture(build_plan(load_recipe(path)))["rows"]
    base, ft1 = family.base.name, family.finetunes[1].name
    assert [r["sources"] for r in rows] == [
        [(base, 0)],
        [(base, 1)],
        [(base, 1)],
        [(base, 2)],
        [(ft1, 3)],
        None,
    ]
    assert run_cli("plot", path, "-o", tmp_path / "r.svg") == 0
    svg = (tmp_path / "r.svg").read_text()
    assert "source layers, by model" in svg and ft1 in svg and "SCE" not in svg
    path.write_text(yaml.safe_dump(case(family, "slerp-two-slices")))
    rows = share_picture(build_plan(load_recipe(path)))["rows"]
    assert [r["t"] for r in rows[:2]] == pytest.approx([0.1, 0.9])
    assert run_cli("plot", path, "-o", tmp_path / "s.svg") == 0
    assert "t, the layer" in (tmp_path / "s.svg").read_text()
