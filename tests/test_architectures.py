"""Which tensors are decoder layers, on the architectures transformers ships, against a
reference that does not use lazymerge's names: tiny random models built from
transformers' own config classes, PEFT's `merge_and_unload` for the other's LoRA, and
each tensor's decoder layer read from the module tree (the parameter objects inside the
decoder's `layers`/`h` ModuleList), never from a tensor's name.

Saved names and module names differ (transformers 5 saves Gemma 3 under the older
`language_model.model.*` names while its modules are `model.language_model.*`), so a saved
tensor is tied to its parameter by value: every parameter is perturbed at random, which
makes each one unique.

Gemma 3 with the adapter PEFT saves today is an expected failure: lazymerge looks for the
adapter's module names (`model.language_model.layers.N...`) in a checkpoint saved under
`language_model.model.layers.N...` and refuses it. The same merge with the adapter's
modules under the saved names (as PEFT wrote them before transformers 4.52) runs.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from contextlib import redirect_stderr
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import load_merged, run_cli

N_LAYERS = 3  # linspace(0.9, 0, 3): 0.9, 0.45, 0.0 -- the last layer keeps the base
WEIGHT = 0.25  # the other's LoRA
VALUES = [0.9, 0.0]
RATIOS = np.linspace(*VALUES, N_LAYERS)


@dataclass(frozen=True)
class Arch:
    """One architecture: its tiny config, the decoder's ModuleList in its module tree, the
    LoRA's targets, and what its checkpoint should look like."""

    config: Callable[[], Any]
    model_class: str  # a transformers class, also used to load the output
    decoder: Callable[[torch.nn.Module], torch.nn.ModuleList]
    targets: tuple[str, ...]
    prefix: str  # the decoder layers' saved names: <prefix>.<i>.*
    changed: int  # tensors a gradient over layers 0..N-2 changes (the decoder's, r > 0)
    tower: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    towers: tuple[str, ...] = ()  # the other numbered stacks, as `plan` names them
    lora: tuple[tuple[str, object], ...] = ()  # more LoraConfig arguments
    # The adapter's modules renamed to the checkpoint's saved names, as PEFT wrote them
    # when the module tree still had those names (Gemma 3 before transformers 4.52).
    saved_names_adapter: bool = False


def llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip


def gpt2_config() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=N_LAYERS, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def falcon_config() -> Any:
    from transformers import FalconConfig

    return FalconConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4
    )


def gpt_neox_config() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip


def gemma3_config() -> Any:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        sliding_window=16,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=125, eoi_token_index=126, image_token_index=127,
    )  # fmt: skip


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEOX_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ARCHS = {
    "llama": Arch(
        llama_config, "LlamaForCausalLM", lambda m: m.model.layers, LLAMA_TARGETS,
        "model.layers", changed=2 * 9,
    ),
    # Conv1D keeps its weight as [in, out]: PEFT needs fan_in_fan_out for it.
    "gpt2": Arch(
        gpt2_config, "GPT2LMHeadModel", lambda m: m.transformer.h, ("c_attn", "c_proj", "c_fc"),
        "transformer.h", changed=2 * 12, lora=(("fan_in_fan_out", True),),
    ),
    "falcon": Arch(
        falcon_config, "FalconForCausalLM", lambda m: m.transformer.h, NEOX_TARGETS,
        "transformer.h", changed=2 * 6,
    ),
    "gpt_neox": Arch(
        gpt_neox_config, "GPTNeoXForCausalLM", lambda m: m.gpt_neox.layers, NEOX_TARGETS,
        "gpt_neox.layers", changed=2 * 12,
    ),
    # The LoRA's q/k/v_proj also match the SigLIP tower's attention: the other's tower is
    # changed, and the merge must still keep the base's.
    "gemma3": Arch(
        gemma3_config, "Gemma3ForConditionalGeneration",
        lambda m: m.model.language_model.layers, LLAMA_TARGETS,
        "language_model.model.layers", changed=2 * 13,
        tower=lambda m: m.model.vision_tower, towers=("vision_tower.encoder.layers",),
    ),
}  # fmt: skip
ARCHS["gemma3_saved_names_adapter"] = replace(ARCHS["gemma3"], saved_names_adapter=True)


@dataclass
class Case:
    """One architecture's inputs, lazymerge's output, and the reference for it."""

    arch: Arch
    root: Path
    recipe: Path
    out: Path
    error: str  # what `merge` wrote on stderr when it failed, else ""
    base: dict[str, torch.Tensor]  # the base's saved tensors, by saved name
    expected: dict[str, torch.Tensor]  # the reference output, float16
    layer: dict[str, int | None]  # saved name -> decoder layer, from the module tree
    in_tower: set[str]  # saved names of the tower's tensors (Gemma 3's vision)
    tower_lora: int  # of those, how many the other's LoRA changed


def model_class(arch: Arch) -> Any:
    import transformers

    return getattr(transformers, arch.model_class)


def saved(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def make_model(arch: Arch, directory: Path, seed: int) -> torch.nn.Module:
    """A random model, every parameter perturbed (trained-looking norms and biases, and no
    two tensors alike), saved by transformers in several shards."""
    torch.manual_seed(seed)
    model = model_class(arch)(arch.config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="50KB")
    return model


def make_lora(arch: Arch, model_dir: Path, directory: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(arch.targets), init_lora_weights=False,
        **dict(arch.lora),
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(directory)
    return directory


def owners(model: torch.nn.Module, modules: dict[int, torch.nn.Module]) -> dict[str, int | None]:
    """Module-tree name -> the key of the module in `modules` whose parameters include it
    (by identity), else None."""
    owner = {id(t): key for key, m in modules.items() for t in m.parameters()}
    return {name: owner.get(id(t)) for name, t in model.state_dict(keep_vars=True).items()}


def tree_names(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Saved name -> the module-tree name of the parameter holding the same values."""
    params = list(model.state_dict().items())
    names = {}
    for key, t in tensors.items():
        found = {n for n, p in params if p.shape == t.shape and torch.equal(p, t)}
        # Tied weights are one parameter under two names (embeddings and lm_head).
        objects = {id(model.get_parameter(n)) for n in found}
        assert len(objects) == 1, f"{key}: matches {sorted(found)}"
        names[key] = sorted(found)[0]
    return names


def peft_merge(arch: Arch, model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the adapter at WEIGHT (set_scale on every LoRA layer), in fp32."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for module in layers:
        for name in module.scaling:
            module.set_scale(name, WEIGHT)
    merged = peft_model.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def write_recipe(path: Path, base: Path, other: Path, lora: Path, **extra: object) -> Path:
    recipe = {
        "base": str(base),
        "other": {"model": str(other), "loras": [{"path": str(lora), "weight": WEIGHT}]},
        "gradient": {"values": VALUES},
        "output": {"dtype": "float16"},
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def build_case(arch: Arch, root: Path) -> Case:
    model = make_model(arch, root / "base", seed=1)
    make_model(arch, root / "other", seed=2)
    lora = make_lora(arch, root / "other", root / "lora", seed=3)
    base = saved(root / "base")
    names = tree_names(model, base)
    in_decoder = owners(model, dict(enumerate(arch.decoder(model))))
    layer = {key: in_decoder[names[key]] for key in base}
    in_tower_tree = owners(model, {0: arch.tower(model)} if arch.tower is not None else {})
    in_tower = {key for key in base if in_tower_tree[names[key]] is not None}
    other = saved(root / "other")
    merged = peft_merge(arch, root / "other", lora)
    expected = {}
    for key, b in base.items():
        o = merged[names[key]]
        r = 0.0 if layer[key] is None else float(RATIOS[layer[key]])
        expected[key] = ((1 - r) * b.float() + r * o.float()).to(torch.float16)
    # Tower tensors the LoRA changed in the other: a tower blended would show.
    tower_lora = sum(not torch.equal(merged[names[k]], other[k]) for k in in_tower)
    if arch.saved_names_adapter:
        lora = rename_adapter(lora, root / "lora_saved_names", names)
    recipe = write_recipe(root / "recipe.yaml", root / "base", root / "other", lora)
    error = cli_error("merge", recipe, "-o", root / "out", "-q")
    return Case(
        arch, root, recipe, root / "out", error, base, expected, layer, in_tower, tower_lora
    )


def cli_error(*args: object) -> str:
    """Run the command line; "" when it succeeds, else its one stderr line."""
    with redirect_stderr(io.StringIO()) as err:
        rc = run_cli(*args)  # type: ignore[arg-type]
    assert rc in (0, 1) and (rc == 0) == (err.getvalue() == ""), err.getvalue()
    return err.getvalue()


def rename_adapter(adapter: Path, directory: Path, names: dict[str, str]) -> Path:
    """A copy of `adapter` whose tensors name each module as the checkpoint saves it
    (`names`: saved name -> module-tree name)."""
    module = {
        tree.removesuffix(".weight"): key.removesuffix(".weight") for key, tree in names.items()
    }
    shutil.copytree(adapter, directory)
    path = directory / "adapter_model.safetensors"
    tensors = {}
    for key, t in load_file(str(path)).items():
        head, _, tail = key.removeprefix("base_model.model.").partition(".lora_")
        tensors[f"base_model.model.{module[head]}.lora_{tail}"] = t
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


def output(case: Case) -> Path:
    """The merged output (the merge must have succeeded)."""
    assert not case.error, case.error
    return case.out


@pytest.fixture(scope="module")
def built() -> dict[str, Case]:
    return {}


def get_case(built: dict[str, Case], factory: pytest.TempPathFactory, name: str) -> Case:
    """Each architecture built and merged once per module, whichever test asks first."""
    if name not in built:
        built[name] = build_case(ARCHS[name], factory.mktemp(name))
    return built[name]


@pytest.fixture(scope="module", params=list(ARCHS))
def case(
    request: pytest.FixtureRequest, built: dict[str, Case], tmp_path_factory: pytest.TempPathFactory
) -> Case:
    return get_case(built, tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def llama(built: dict[str, Case], tmp_path_factory: pytest.TempPathFactory) -> Case:
    return get_case(built, tmp_path_factory, "llama")


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp16 ulps: the bit patterns as sign-magnitude integers, made monotone."""

    def ordinal(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordinal(a) - ordinal(b)).abs()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_saved_decoder_layers_are_named_by_the_stack(case: Case) -> None:
    """The checkpoint as transformers saves it: the module tree's decoder layer i is
    `<prefix>.<i>.*`, and nothing else is under the prefix."""
    prefix = case.arch.prefix
    in_layers = {key for key, i in case.layer.items() if i is not None}
    assert {case.layer[k] for k in in_layers} == set(range(N_LAYERS))
    for key in case.base:
        i = case.layer[key]
        assert (
            key.startswith(f"{prefix}.{i}.") if i is not None else not key.startswith(f"{prefix}.")
        )
    assert bool(case.in_tower) == (case.arch.tower is not None)
    for tower in case.arch.towers:
        assert {k for k in case.base if k.startswith(f"{tower}.")} <= case.in_tower


def test_merge_equals_module_tree_reference(case: Case) -> None:
    ours = load_merged(output(case))
    assert set(ours) == set(case.expected)
    worst = {}
    for key, want in case.expected.items():
        assert ours[key].dtype == torch.float16, key
        worst[key] = int(ulps(ours[key], want).max())
    assert max(worst.values()) <= 1, {k: v for k, v in worst.items() if v > 1}


def test_gradient_changes_exactly_the_decoder_layers(case: Case) -> None:
    """A gradient that changes nothing, or changes a vision tower, fails here."""
    ours = load_merged(output(case))
    blended = {key for key, i in case.layer.items() if i is not None and RATIOS[i] > 0}
    assert len(blended) == case.arch.changed
    changed = {key for key, b in case.base.items() if not same_bytes(ours[key], b.half())}
    assert changed == blended
    if case.arch.tower is not None:
        assert case.tower_lora == 2 * 3  # q, k, v_proj of each of the tower's 2 layers
    for key in case.in_tower:  # the base's tower, whatever the other's LoRA did to its own
        assert same_bytes(ours[key], case.base[key].half()), key


def test_output_loads_with_no_missing_or_unexpected_keys(case: Case) -> None:
    _, info = model_class(case.arch).from_pretrained(output(case), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_plan_names_the_decoder_stack(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    output(case)  # plan reads the same adapter
    capsys.readouterr()
    assert run_cli("plan", case.recipe) == 0
    line = f"decoder layers: {case.arch.prefix}.0-{N_LAYERS - 1} ({N_LAYERS})"
    if case.arch.towers:
        line += "; not decoder layers: " + ", ".join(case.arch.towers)
    lines = capsys.readouterr().out.splitlines()
    assert line in lines
    # PEFT names Gemma 3's modules as in memory; its checkpoint stores them otherwise
    mapped = [x for x in lines if "module names mapped to the checkpoint's" in x]
    if case.arch.towers and not case.arch.saved_names_adapter:
        assert mapped == [
            f"{case.root / 'lora'}: module names mapped to the checkpoint's "
            "(model.language_model.* -> language_model.model.*, model.multi_modal_projector.* "
            "-> multi_modal_projector.*, model.vision_tower.* -> vision_tower.*, lm_head.* -> "
            "language_model.lm_head.*)"
        ]
    else:
        assert mapped == []


def two_stacks(model_dir: Path, directory: Path) -> Path:
    """A copy of a saved Llama whose decoder layers are also saved as `transformer.h.*`
    (each shard and the index), so two known decoder stacks are present."""
    shutil.copytree(model_dir, directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(shard))
        copies = {
            "transformer.h." + k.removeprefix("model.layers."): v.clone()
            for k, v in tensors.items()
            if k.startswith("model.layers.")
        }
        save_file({**tensors, **copies}, str(shard), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(copies, shard.name))
    index_path.write_text(json.dumps(index))
    return directory


def error_of(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    capsys.readouterr()
    assert run_cli(*args) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("lazymerge: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def doubled(llama: Case) -> tuple[Path, Path]:
    return two_stacks(llama.root / "base", llama.root / "base2"), two_stacks(
        llama.root / "other", llama.root / "other2"
    )


def test_two_decoder_stacks_are_refused(
    llama: Case, doubled: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, other = doubled
    assert (
        "transformer.h.0.mlp.up_proj.weight"
        in json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    )
    recipe = write_recipe(tmp_path / "r.yaml", base, other, llama.root / "lora")
    err = error_of(capsys, "merge", recipe, "-o", tmp_path / "out")
    assert f"base {base}: two decoder layer stacks" in err
    assert f"model.layers ({N_LAYERS}), transformer.h ({N_LAYERS})" in err
    assert "layers_prefix: model.layers" in err
    assert not (tmp_path / "out").exists()


def test_layers_prefix_settles_two_stacks(
    llama: Case, doubled: tuple[Path, Path], tmp_path: Path
) -> None:
    base, other = doubled
    recipe = write_recipe(
        tmp_path / "r.yaml", base, other, llama.root / "lora", layers_prefix="model.layers"
    )
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    ours = load_merged(tmp_path / "out")
    copies = {k for k in ours if k.startswith("transformer.h.")}
    assert len(copies) == N_LAYERS * 9 and set(ours) == set(llama.expected) | copies
    for key, want in llama.expected.items():
        assert int(ulps(ours[key], want).max()) <= 1, key
    for key in copies:  # not decoder layers: rest (0), the base's
        original = "model.layers." + key.removeprefix("transformer.h.")
        assert same_bytes(ours[key], llama.base[original].half()), key


def test_layers_prefix_with_no_such_stack_is_refused(
    llama: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", llama.root / "base", llama.root / "other", llama.root / "lora",
        layers_prefix="nope",
    )  # fmt: skip
    err = error_of(capsys, "merge", recipe, "-o", tmp_path / "out")
    assert err.startswith(f"lazymerge: error: layers_prefix 'nope': base {llama.root / 'base'}")
    assert "has no tensor <prefix>.<n>.* under it (numbered stacks there: model.layers)" in err
    assert not (tmp_path / "out").exists()
