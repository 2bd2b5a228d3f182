"""Issue 17: mergekit's `modules:` configs (its modular architectures), through
`mergekit-yaml` (mergekit 0.1.5, tests/mergekit_ref.py) and through `lazymerge merge`, on
tiny random Gemma 3 and Mistral 3 vision-language models (tests/vlm_fixtures.py): a text
decoder, a vision tower (SigLIP, Pixtral) and a projector, each merged by its own slices or
models with its own parameters, a gradient running over each module's own layers.

Compared: every tensor within 1 fp16 ulp (bit for bit, in practice), its dtype, the
output's names; config.json's per-module layer counts. A plain `models:` config on such
a model is mergekit's too: every module merges the models over its own layers.

mergekit 0.1.5 writes a module's new layer count but not `text_config.layer_types`, so
its Gemma 3 with more text layers than the donor does not load in transformers 5
("num_hidden_layers (5) must be equal to the number of layer_types (4)"); lazymerge's
layer_types follow the output's layers, and its output loads and runs. Mistral 3 has no
per-layer lists, so there the two config.json files are the same. Each module holds what
mergekit's JSON lists for it. Bad configs are refused in one line naming the key, before
anything is written.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lazymerge.errors import RecipeError
from lazymerge.meaning.modules import modules_of, split
from lazymerge.recipe.parse import parse_recipe

from conftest import error_of, make_llama, run_cli, session_runs
from mergekit_ref import Mergekit, load_checkpoint, run_many
from test_mergekit_methods import ulps
from vlm_fixtures import (
    build_all,
    build_all_mistral3,
    build_mistral3,
    forward,
    forward_mistral3,
    hub_name,
)

pytestmark = pytest.mark.mergekit

Models = dict[str, Path]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_all(tmp_path_factory.mktemp("vlms"))


@pytest.fixture(scope="module")
def mistral3s(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_all_mistral3(tmp_path_factory.mktemp("mistral3s"))


def src(model: Path, start: int, end: int, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(model), "layer_range": [start, end]}
    return entry | ({"parameters": params} if params else {})


def entry(model: Path, **params: Any) -> dict[str, Any]:
    return {"model": str(model)} | ({"parameters": params} if params else {})


def modules_a(m: Models, first: int = 2, mlp: str = "mlp") -> dict[str, Any]:
    """linear: the text decoder by two slices (a source's weight over the module's, a
    slice's gradient), the vision tower by models (a gradient over its own 3 layers, a
    filter on its MLPs, named `mlp`; the module's normalize over the config's), the
    projector by models (the config's weight). `first` 3: a first slice of 3 layers, 5
    text layers in all."""
    text = {
        "parameters": {"weight": 0.25},
        "slices": [
            {"sources": [src(m["a"], 0, first, weight=0.7), src(m["b"], 1, first + 1)]},
            {
                "sources": [src(m["a"], 2, 4), src(m["c"], 2, 4, weight=0.6)],
                "parameters": {"weight": [0.2, 0.8]},
            },
        ],
    }
    vision = {
        "parameters": {"normalize": False},
        "models": [
            entry(m["a"], weight=[0.2, 0.6]),
            entry(m["b"], weight=0.3),
            entry(m["c"], weight=[{"filter": mlp, "value": 0.5}, {"value": 0.1}]),
        ],
    }
    return {
        "merge_method": "linear", "dtype": "float32", "out_dtype": "float16",
        "parameters": {"weight": 1.0, "normalize": True},
        "modules": {
            "text_decoder": text, "vision_tower": vision,
            "multi_modal_projector": {"models": [entry(m["b"]), entry(m["c"])]},
        },
    }  # fmt: skip


def modules_b(m: Models) -> dict[str, Any]:
    """task_arithmetic against a base no module lists (it joins each module last)."""
    return {
        "merge_method": "task_arithmetic", "base_model": str(m["a"]),
        "dtype": "float32", "out_dtype": "float16",
        "modules": {
            "text_decoder": {"models": [entry(m["b"], weight=0.5), entry(m["c"], weight=0.3)]},
            "vision_tower": {"parameters": {"weight": 0.4}, "models": [entry(m["b"]), entry(m["c"])]},
            "multi_modal_projector": {"parameters": {"weight": 1.0}, "models": [entry(m["b"])]},
        },
    }  # fmt: skip


def passthrough(m: Models) -> dict[str, Any]:
    """A frankenmerge of both stacks: 5 text layers, 4 vision layers (c's cast to fp16)."""
    return {
        "merge_method": "passthrough", "dtype": "float16",
        "modules": {
            "text_decoder": {"slices": [{"sources": [src(m["a"], 0, 2)]},
                                        {"sources": [src(m["b"], 1, 4)]}]},
            "vision_tower": {"slices": [{"sources": [src(m["c"], 0, 2)]},
                                        {"sources": [src(m["a"], 1, 3)]}]},
            "multi_modal_projector": {"models": [entry(m["b"])]},
        },
    }  # fmt: skip


def plain_gradient(m: Models) -> dict[str, Any]:
    """A plain models: config: mergekit gives each module's layers their own t."""
    return {
        "merge_method": "linear", "dtype": "float32", "out_dtype": "float16",
        "models": [entry(m["a"], weight=[0.2, 0.8]), entry(m["b"], weight=0.5)],
    }  # fmt: skip


def slerp(m: Models) -> dict[str, Any]:
    """slerp (whole-tensor norms and dot products) with t gradients per module."""
    return {
        "merge_method": "slerp", "base_model": str(m["a"]), "dtype": "float32",
        "out_dtype": "float16", "parameters": {"t": 0.5},
        "modules": {
            "text_decoder": {"slices": [{"sources": [src(m["a"], 0, 4), src(m["b"], 0, 4)],
                                         "parameters": {"t": [0.1, 0.9]}}]},
            "vision_tower": {"parameters": {"t": [0.7, 0.2]}, "models": [entry(m["b"])]},
            "multi_modal_projector": {"models": [entry(m["a"]), entry(m["b"])]},
        },
    }  # fmt: skip


CASES = {
    "modules_a": modules_a,
    "modules_b": modules_b,
    "passthrough": passthrough,
    "plain_gradient": plain_gradient,
    "modules_a_stack": lambda m: modules_a(m, first=3),
    "slerp": slerp,
}
ROTATING = {"modules_a_stack", "slerp"}  # heavy extras: one slice of them per run
CASE_PARAMS = [
    pytest.param(c, id=c, marks=pytest.mark.rotating if c in ROTATING else ()) for c in CASES
]
# Mistral 3: the same merges (its vision tower's MLPs are `feed_forward`); each output's
# text and vision layer counts.
MISTRAL3_CASES = {
    "modules_a": lambda m: modules_a(m, mlp="feed_forward"),
    "plain_gradient": plain_gradient,
    "passthrough": passthrough,
}
MISTRAL3_COUNTS = {"modules_a": (4, 3), "plain_gradient": (4, 3), "passthrough": (5, 4)}


@pytest.fixture(scope="module")
def mergekit_outputs(
    mergekit: Mergekit, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Path]:
    """Every case this session compares, merged by mergekit in one process (run_many):
    Gemma 3's by case name, Mistral 3's as `mistral3-<case>`."""
    wanted = {str(i.callspec.params["case"]) for i in session_runs(request, test_matches_mergekit)}
    if session_runs(request, test_output_loads_in_transformers):
        wanted.add("modules_a")
    if session_runs(request, test_transformers_5_layout_merges_as_the_hubs):
        wanted.add("plain_gradient")
    mistral3 = {
        str(i.callspec.params["case"])
        for i in session_runs(request, test_mistral3_matches_mergekit)
    }
    if session_runs(request, test_mistral3_output_loads_in_transformers):
        mistral3.add("modules_a")
    if session_runs(request, test_mistral3_module_tree_layout_merges_as_the_hubs):
        mistral3.add("plain_gradient")
    root = tmp_path_factory.mktemp("mergekit-modules")
    jobs: dict[str, tuple[dict[str, Any], Path]] = {}
    if wanted:
        vlms = request.getfixturevalue("vlms")
        jobs |= {c: (CASES[c](vlms), root / c) for c in sorted(wanted)}
    if mistral3:
        m3 = request.getfixturevalue("mistral3s")
        jobs |= {
            f"mistral3-{c}": (MISTRAL3_CASES[c](m3), root / f"mistral3-{c}")
            for c in sorted(mistral3)
        }
    errors = {k: e for k, e in run_many(mergekit, jobs).items() if e}
    assert not errors, errors
    return {k: out for k, (_, out) in jobs.items()}


def run_lazymerge(cfg: dict[str, Any], tmp: Path, name: str = "lm-out") -> Path:
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run_cli("merge", path, "-o", tmp / name, "-q") == 0
    return tmp / name


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        assert float(ulps(got[name], w).max()) <= 1.0, name


def text_and_vision(config: dict[str, Any]) -> tuple[int, int]:
    return (
        config["text_config"]["num_hidden_layers"],
        config["vision_config"]["num_hidden_layers"],
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_mergekit(
    mergekit_outputs: dict[str, Path], vlms: Models, tmp_path: Path, case: str
) -> None:
    out = run_lazymerge(CASES[case](vlms), tmp_path)
    assert_same_tensors(load_checkpoint(out), load_checkpoint(mergekit_outputs[case]))
    ours = json.loads((out / "config.json").read_text())
    theirs = json.loads((mergekit_outputs[case] / "config.json").read_text())
    assert text_and_vision(ours) == text_and_vision(theirs)
    layer_types = ours["text_config"]["layer_types"]
    assert len(layer_types) == ours["text_config"]["num_hidden_layers"]


def test_output_loads_in_transformers(
    mergekit_outputs: dict[str, Path], vlms: Models, tmp_path: Path
) -> None:
    """mergekit's modules_a and ours give the same logits; the frankenmerge (5 text and 4
    vision layers, each text layer keeping its source layer's attention kind) loads and
    runs too, where mergekit's would not (its layer_types keep 4 entries)."""
    ours = run_lazymerge(modules_a(vlms), tmp_path, "a")
    assert torch.equal(forward(ours), forward(mergekit_outputs["modules_a"]))
    stacked = run_lazymerge(passthrough(vlms), tmp_path, "stacked")
    config = json.loads((stacked / "config.json").read_text())
    assert text_and_vision(config) == (5, 4)
    sliding, full = "sliding_attention", "full_attention"
    assert config["text_config"]["layer_types"] == [sliding, full, full, sliding, full]
    forward(stacked)


def test_transformers_5_layout_merges_as_the_hubs(
    mergekit_outputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Checkpoints as transformers 5 saves them (`vision_tower.*`, which mergekit's
    gemma3vl.json does not name): the same merge, the inputs' names kept."""
    v5 = build_all(tmp_path_factory.mktemp("vlms-v5"), layout="v5")
    got = load_checkpoint(run_lazymerge(plain_gradient(v5), tmp_path))
    assert any(k.startswith("vision_tower.encoder.") for k in got)
    want = load_checkpoint(mergekit_outputs["plain_gradient"])
    assert_same_tensors({hub_name(k): v for k, v in got.items()}, want)


def test_native_modules_recipe_round_trips_and_equals_the_mergekit_config(
    vlms: Models, tmp_path: Path
) -> None:
    """The native syntax (`layers` for `layer_range`): the recipe the manifest and card
    record parses back to the same merge, and gives the same bytes."""
    mergekit_cfg = modules_a(vlms)
    mk = run_lazymerge(mergekit_cfg, tmp_path, "mk")
    recipe = parse_recipe(mergekit_cfg, tmp_path)
    native = recipe.to_dict()
    assert "modules" in native and "merge_method" not in native
    again = parse_recipe(native, tmp_path)
    assert again.merge is not None and recipe.merge is not None
    assert again.merge.modules == recipe.merge.modules
    ours = run_lazymerge(native, tmp_path, "native")
    assert load_checkpoint(ours).keys() == load_checkpoint(mk).keys()
    assert all(torch.equal(v, load_checkpoint(mk)[k]) for k, v in load_checkpoint(ours).items())


def test_plan_and_card_show_each_module(
    vlms: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(modules_a(vlms), sort_keys=False))
    capsys.readouterr()
    assert run_cli("plan", path) == 0
    shown = capsys.readouterr().out.splitlines()
    lines = [
        "modules.text_decoder.slices[0]: layers 0-1 <- linear of a 0-1, b 1-2",
        "modules.text_decoder.slices[1]: layers 2-3 <- linear of a 2-3, c 2-3",
        "modules.text_decoder.parameters: weight 0.25",
        "modules.vision_tower.models: layers 0-2 <- linear of a, b, c",
        "modules.vision_tower.parameters: normalize false",
        "modules.multi_modal_projector.models: no layers <- linear of b, c",
    ]
    assert all(line in shown for line in lines), shown
    rows = {r[:26].strip(): r[26:].split() for r in shown if r.startswith(("text_", "vision_"))}
    assert list(rows) == [*(f"text_decoder {k}" for k in (0, 1, 2, 3, "rest")),
                          *(f"vision_tower {k}" for k in (0, 1, 2, "rest"))]  # fmt: skip
    # the vision tower's own layers: a's gradient [0.2, 0.6] over them, c's filter
    assert rows["vision_tower 1"] == [
        "models[0]:1", "models[1]:1", "models[2]:1", "normalize=false",
        "w", "0.4", "w", "0.3", "w", "0.1", "|", "w", "0.5", "1",
    ]  # fmt: skip
    out = run_lazymerge(modules_a(vlms), tmp_path)
    card = (out / "README.md").read_text()
    assert all(f"- {line}\n" in card for line in lines)
    assert "vision_tower 1  " in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert not Path(recipe["modules"]["vision_tower"]["models"][0]["model"]).is_absolute()
    merge = parse_recipe(recipe, out).merge
    assert merge is not None
    assert replace(merge, source="mergekit") == parse_recipe(modules_a(vlms), tmp_path).merge


@pytest.mark.parametrize("case", list(MISTRAL3_CASES))
def test_mistral3_matches_mergekit(
    mergekit_outputs: dict[str, Path], mistral3s: Models, tmp_path: Path, case: str
) -> None:
    """Every tensor, and config.json whole: the per-module counts, nothing else changed
    (Mistral and Pixtral configs have no per-layer lists)."""
    out = run_lazymerge(MISTRAL3_CASES[case](mistral3s), tmp_path)
    theirs = mergekit_outputs[f"mistral3-{case}"]
    assert_same_tensors(load_checkpoint(out), load_checkpoint(theirs))
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((theirs / "config.json").read_text())
    assert text_and_vision(config) == MISTRAL3_COUNTS[case]


def test_mistral3_output_loads_in_transformers(
    mergekit_outputs: dict[str, Path], mistral3s: Models, tmp_path: Path
) -> None:
    """Ours and mergekit's modules_a give the same logits on an image and text."""
    ours = run_lazymerge(MISTRAL3_CASES["modules_a"](mistral3s), tmp_path)
    assert torch.equal(
        forward_mistral3(ours), forward_mistral3(mergekit_outputs["mistral3-modules_a"])
    )


@pytest.mark.rotating
def test_mistral3_stacked_output_loads_in_transformers(mistral3s: Models, tmp_path: Path) -> None:
    """A frankenmerge of both stacks (5 text layers, 4 vision layers) loads and runs."""
    stacked = run_lazymerge(passthrough(mistral3s), tmp_path)
    assert text_and_vision(json.loads((stacked / "config.json").read_text())) == (5, 4)
    forward_mistral3(stacked)


# A Mistral 3 saved from its module tree's state_dict(), not by save_pretrained.
MODULE_TREE = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}


def module_tree_name(name: str) -> str:
    old = next(p for p in MODULE_TREE if name.startswith(p))
    return MODULE_TREE[old] + name.removeprefix(old)


@pytest.mark.rotating
def test_mistral3_module_tree_layout_merges_as_the_hubs(
    mergekit_outputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The module tree's names (`model.language_model.*`, `lm_head.*`...): the same merge,
    those names kept; the output loads."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("mistral3-tree")
    models = {}
    for n, (seed, dtype) in {"a": (1, torch.float16), "b": (2, torch.float16)}.items():
        file = build_mistral3(root / n, seed, dtype) / "model.safetensors"
        tensors = {module_tree_name(k): v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
        models[n] = root / n
    out = run_lazymerge(plain_gradient(models), tmp_path)
    want = load_checkpoint(mergekit_outputs["mistral3-plain_gradient"])
    assert_same_tensors(load_checkpoint(out), {module_tree_name(k): v for k, v in want.items()})
    forward_mistral3(out)


@pytest.mark.rotating
def test_mistral3_projector_biases_are_merged(tmp_path: Path) -> None:
    """multimodal_projector_bias: true. mergekit's mistral3.json lists no projector bias,
    so mergekit leaves both out and its output loads them newly initialised; here they
    are the projector's, merged like its weights."""
    models = {
        n: build_mistral3(tmp_path / n, seed, torch.float16, True)
        for n, seed in (("a", 1), ("b", 2))
    }
    cfg = {
        "merge_method": "linear", "dtype": "float32", "out_dtype": "float16",
        "models": [entry(models["a"], weight=0.5), entry(models["b"], weight=0.5)],
    }  # fmt: skip
    out = run_lazymerge(cfg, tmp_path)
    got, a, b = (load_checkpoint(p) for p in (out, models["a"], models["b"]))
    for name in ("multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.bias"):
        want = ((a[name].float() + b[name].float()) / 2).half()
        assert float(ulps(got[name], want).max()) <= 1.0, name
    forward_mistral3(out)


@pytest.mark.parametrize("arch", ["gemma3vl", "mistral3"])
def test_modules_hold_what_mergekits_json_lists(
    mergekit: Mergekit, request: pytest.FixtureRequest, arch: str
) -> None:
    """Each module of the table holds exactly the tensors of the checkpoint (in the
    Hub's layout) that mergekit's architecture JSON lists for it under its weight_prefix
    (pre_weights, each layer's templates, post_weights), in the JSON's order of modules;
    the ones it takes after its layers are the post_weights; its layer count is at the
    JSON's num_layers_config_key."""
    model = request.getfixturevalue("vlms" if arch == "gemma3vl" else "mistral3s")["a"]
    data = "lib/python*/site-packages/mergekit/_data/architectures"
    (file,) = mergekit.venv.glob(f"{data}/{arch}.json")
    spec = json.loads(file.read_text())
    config = json.loads((model / "config.json").read_text())
    names = set(load_checkpoint(model))
    defs = modules_of(config)
    assert defs is not None and [d.name for d in defs] == list(spec["modules"])
    held = split(names, defs, str(model))
    for d in defs:
        module, mine = spec["modules"][d.name], held[d.name]
        body, prefix = module["architecture"], module["weight_prefix"] or ""
        assert d.count_key == body.get("num_layers_config_key")
        n = mine.stack.count
        if d.count_key is not None:
            text, leaf = d.count_key.split(".")
            assert n == config[text][leaf] > 0
        layers = {
            prefix + w["name"].replace("${layer_index}", str(i))
            for w in body["layer_templates"]["weights"]
            for i in range(n)
        }
        pre, post = ({prefix + w["name"] for w in body[k]} for k in ("pre_weights", "post_weights"))
        required = {prefix + w["name"] for w in body["pre_weights"] + body["post_weights"]}
        required -= {prefix + w["name"] for w in body["post_weights"] if w.get("optional")}
        assert set(mine.names) == (pre | layers | post) & names and required <= names
        assert {x for x in mine.names if mine.is_post(x)} == post & names


def _bad(m: Models, case: str, tmp: Path) -> dict[str, Any]:
    cfg = modules_b(m)
    modules = cfg["modules"]
    if case == "unknown_module":
        modules["audio_tower"] = modules.pop("vision_tower")
    elif case == "another_architectures_module":
        modules["vision_model"] = modules.pop("vision_tower")
    elif case == "own_method":
        modules["vision_tower"]["merge_method"] = "passthrough"
    elif case == "models_and_slices":
        modules["text_decoder"]["slices"] = [{"sources": [src(m["a"], 0, 4)]}]
    elif case == "range_past_end":
        modules["vision_tower"] = {"slices": [{"sources": [src(m["a"], 0, 5), src(m["b"], 0, 5)]}]}
    elif case == "omitted_module":
        del modules["multi_modal_projector"]
    elif case == "top_level_slices":
        del cfg["modules"]
        cfg["slices"] = [{"sources": [src(m["a"], 0, 4), src(m["b"], 0, 4)]}]
    elif case == "models_and_modules":
        cfg["models"] = [entry(m["b"])]
    elif case == "not_modular":
        llama = make_llama(tmp / "llama", seed=1)
        cfg = {"merge_method": "linear", "parameters": {"weight": 0.5},
               "modules": {"text_decoder": {"models": [entry(llama)]}}}  # fmt: skip
    return cfg


BAD = {
    "unknown_module": "modules.audio_tower: {a} (Gemma3ForConditionalGeneration) has no module "
    "audio_tower; its modules: text_decoder, multi_modal_projector, vision_tower",
    "another_architectures_module": "modules.vision_model: {a} (Gemma3ForConditionalGeneration) "
    "has no module vision_model",
    "own_method": "modules.vision_tower: unknown key 'merge_method'; a module has models, "
    "slices, parameters",
    "models_and_slices": "modules.text_decoder: give it models or slices, one of the two",
    "range_past_end": "modules.vision_tower.slices[0].sources[0]: layers [0, 5) reach past "
    "{a}'s vision_tower: it has 3 layers (0..2)",
    "omitted_module": "modules: multi_modal_projector is missing: {a} "
    "(Gemma3ForConditionalGeneration) has it (2 tensors) and mergekit would leave it out",
    "top_level_slices": "Gemma3ForConditionalGeneration has modules text_decoder, "
    "multi_modal_projector, vision_tower: slice them under modules:",
    "models_and_modules": "give models or modules, not both",
    "not_modular": "is a LlamaForCausalLM, not an architecture lazymerge knows modules of",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line_and_writes_nothing(
    vlms: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_bad(vlms, case, tmp_path), sort_keys=False))
    err = error_of(capsys, "merge", path, "-o", tmp_path / "out")
    assert BAD[case].format(a=vlms["a"]) in err
    assert not (tmp_path / "out").exists()


def test_mixed_layouts_are_refused(
    vlms: Models, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path_factory.mktemp("mixed")
    from vlm_fixtures import MODELS, build

    seed, dtype = MODELS["b"]
    v5 = build(root / "b", seed, dtype, layout="v5")
    cfg = {
        "merge_method": "linear",
        "models": [entry(vlms["a"], weight=0.5), entry(v5, weight=0.5)],
    }
    (root / "cfg.yml").write_text(yaml.safe_dump(cfg))
    err = error_of(capsys, "merge", root / "cfg.yml", "-o", root / "out")
    assert f"{v5} keeps vision_tower's layers in vision_tower.encoder.layers" in err
    assert not (root / "out").exists()


def test_mistral3_module_it_lacks_is_one_line(
    mistral3s: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Llama 4's name for its tower, on a Mistral 3."""
    cfg = modules_b(mistral3s)
    cfg["modules"]["vision_model"] = cfg["modules"].pop("vision_tower")
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    err = error_of(capsys, "merge", path, "-o", tmp_path / "out")
    assert err == (
        f"lazymerge: error: modules.vision_model: {mistral3s['a']} (Mistral3ForConditionalGeneration) has no "
        "module vision_model; its modules: text_decoder, multi_modal_projector, vision_tower\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"layers_prefix": "language_model.model.layers"}, "layers_prefix: not with modules"),
        ({"modules": {"text_decoder": {"models": [], "dtype": "float16"}}}, "unknown key 'dtype'"),
        (
            {"modules": {"text_decoder": {"parameters": {"weight": 1.0}}}},
            "give it models or slices",
        ),
        ({"modules": []}, "modules: expected a mapping of module names"),
    ],
)
def test_bad_native_modules_recipe_is_one_line(
    vlms: Models, tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    native = parse_recipe(modules_b(vlms), tmp_path).to_dict() | change
    with pytest.raises(RecipeError) as e:
        parse_recipe(native, tmp_path, "r.yaml")
    assert expected in str(e.value) and "\n" not in str(e.value)
