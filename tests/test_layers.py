"""Which numbered stack holds the decoder layers: decided from known prefixes, never
guessed; towers are not layers; ambiguity and the unknown are errors naming the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lazymerge.errors import InputError, RecipeError
from lazymerge.meaning.layers import LayerStack, find_stack, natural_key
from lazymerge.meaning.order import Order, order_of
from lazymerge.meaning.ratios import all_ratios
from lazymerge.recipe.spec import GradientRule

from conftest import N_LAYERS, run_cli, tiny_config


def names(
    prefix: str, n: int, modules: tuple[str, ...] = ("attn.weight", "mlp.weight")
) -> list[str]:
    return [f"{prefix}.{i}.{m}" for i in range(n) for m in modules]


@pytest.mark.parametrize(
    ("prefix", "extra"),
    [
        ("model.layers", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]),
        ("transformer.h", ["transformer.wte.weight", "transformer.ln_f.weight"]),
        ("h", ["wte.weight", "ln_f.weight"]),  # GPT-2 as its hub checkpoint stores it
        ("gpt_neox.layers", ["gpt_neox.embed_in.weight", "embed_out.weight"]),
        ("model.decoder.layers", ["model.decoder.embed_tokens.weight"]),
        ("backbone.layers", ["backbone.embeddings.weight"]),
    ],
)
def test_known_stacks(prefix: str, extra: list[str]) -> None:
    stack = find_stack(names(prefix, 3) + extra, "m")
    assert stack == LayerStack(prefix, 3)
    assert [stack.layer_of(n) for n in names(prefix, 3)] == [0, 0, 1, 1, 2, 2]
    assert all(stack.layer_of(n) is None for n in extra)


def test_experts_belong_to_their_layer() -> None:
    experts = [f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in range(2) for e in range(8)]
    stack = find_stack(experts, "m")
    assert stack == LayerStack("model.layers", 2)
    assert stack.layer_of("model.layers.1.mlp.experts.7.w1.weight") == 1


def test_a_multimodal_models_towers_are_not_layers() -> None:
    text = names("model.language_model.layers", 4)
    vision = names("model.vision_tower.vision_model.encoder.layers", 6)
    stack = find_stack(text + vision, "m")
    assert stack == LayerStack(
        "model.language_model.layers", 4, ("model.vision_tower.vision_model.encoder.layers",)
    )
    assert all(stack.layer_of(n) is None for n in vision)
    assert stack.describe() == (
        "decoder layers: model.language_model.layers.0-3 (4); not decoder layers: "
        "model.vision_tower.vision_model.encoder.layers"
    )
    # the towers sort after the decoder layers, not among them
    ordered = sorted(vision + text, key=lambda n: natural_key(n, stack))
    assert ordered[: len(text)] == sorted(text, key=lambda n: natural_key(n, stack))


def test_two_known_stacks_are_ambiguous() -> None:
    with pytest.raises(InputError) as e:
        find_stack(names("model.layers", 2) + names("transformer.h", 2), "base /x")
    assert str(e.value) == (
        "base /x: two decoder layer stacks among its numbered stacks: model.layers (2), "
        "transformer.h (2); name the decoder's in the recipe, e.g. layers_prefix: model.layers"
    )


def test_only_unknown_stacks_are_not_guessed() -> None:
    with pytest.raises(InputError) as e:
        find_stack(names("encoder.block", 2), "base /x")
    assert str(e.value) == (
        "base /x: no known decoder layer stack among its numbered stacks: encoder.block (2); "
        "name the decoder's in the recipe, e.g. layers_prefix: encoder.block"
    )


def test_layers_prefix_settles_it() -> None:
    both = names("model.layers", 2) + names("transformer.h", 3)
    assert find_stack(both, "m", "transformer.h") == LayerStack(
        "transformer.h", 3, ("model.layers",)
    )
    assert find_stack(names("encoder.block", 2), "m", "encoder.block").count == 2
    with pytest.raises(RecipeError) as e:
        find_stack(both, "base /x", "nope")
    assert str(e.value) == (
        "layers_prefix 'nope': base /x has no tensor <prefix>.<n>.* under it "
        "(numbered stacks there: model.layers, transformer.h)"
    )


def test_no_numbered_stack_is_no_layers() -> None:
    stack = find_stack(["embed.weight", "lm_head.weight"], "m")
    assert stack == LayerStack(None, 0)
    assert stack.layer_of("embed.weight") is None
    assert stack.describe() == "decoder layers: none"


def test_inspect_names_the_stack_and_the_head(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaForCausalLM

    assert run_cli("inspect", models["base"]) == 0
    text = capsys.readouterr().out
    assert f"decoder layers: model.layers.0-{N_LAYERS - 1} ({N_LAYERS})\n" in text
    assert "output head: lm_head (untied)\n" in text
    config = tiny_config()
    config.tie_word_embeddings = True
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    assert run_cli("inspect", tmp_path / "tied") == 0
    text = capsys.readouterr().out
    assert "output head: none stored (tied to the input embeddings, as config.json says)\n" in text


def test_an_unknown_family_keeps_the_llama_order_but_refuses_tensor_mode(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model_type without a table (meaning/order.py): the output keeps the Llama order,
    a layer gradient merges, and tensor mode, whose anchors would land in an arbitrary
    order, is one line naming the model_type."""
    base = Path(shutil.copytree(models["base"], tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "opt"}))
    recipe = tmp_path / "r.yaml"
    for over, rc in (("layers", 0), ("tensors", 1)):
        gradient = {"over": over, "values": [0.9, 0.0]}
        recipe.write_text(yaml.safe_dump({
            "base": str(base), "other": str(models["other"]), "gradient": gradient
        }))  # fmt: skip
        capsys.readouterr()
        assert run_cli("plan", recipe) == rc
    assert capsys.readouterr().err == (
        "lazymerge: error: over: tensors: lazymerge has no natural order for model_type "
        "'opt', so the anchors would land in an arbitrary order; use over: layers\n"
    )


def test_a_tensor_its_familys_table_does_not_name_is_not_guessed() -> None:
    stack = LayerStack("transformer.h", 1, order=order_of({"model_type": "gpt2"}))
    names = ["transformer.h.0.ln_1.weight", "transformer.h.0.extra.weight"]
    ordered = sorted(reversed(names), key=lambda n: natural_key(n, stack))
    assert ordered == names  # the output: after its layer's named modules
    layers = GradientRule(values=(0.9, 0.1))
    assert all_ratios(names, [layers], stack) == dict.fromkeys(names, 0.9)
    tensors = GradientRule(values=(0.9, 0.1), over="tensors")
    with pytest.raises(RecipeError) as e:
        all_ratios(names, [tensors], stack)
    assert str(e.value) == (
        "over: tensors: transformer.h.0.extra.weight is not in model_type 'gpt2''s natural "
        "order (transformers' GPT2LMHeadModel, GPT2Model, GPT2Block, GPT2Attention, GPT2MLP), "
        "so its anchor would be a guess; leave it to another rule with a filter, or use "
        "over: layers"
    )
    unknown = LayerStack("model.layers", 1, order=Order("opt", None))
    with pytest.raises(RecipeError, match="no natural order for model_type 'opt'"):
        all_ratios(["model.layers.0.x.weight"], [tensors], unknown)


@pytest.mark.parametrize("bias", [False, True])
def test_mistral3_natural_order_is_its_state_dict(bias: bool) -> None:
    """Mistral 3's table (meaning/order.py) against transformers' own module tree: the
    saved names sorted by natural_key come out in state_dict() order, the Pixtral tower's
    blocks and the projector (with its optional biases) included."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from vlm_fixtures import mistral3_config

    config = mistral3_config()
    config.multimodal_projector_bias = bias
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    saved = list(model.state_dict())
    stack = find_stack(saved, "mistral3", None)
    stack = LayerStack(
        stack.prefix, stack.count, stack.towers, order_of({"model_type": "mistral3"})
    )
    assert stack.order.table is not None
    shuffled = sorted(saved, key=lambda n: (len(n) * 7919) % 101)
    assert sorted(shuffled, key=lambda n: natural_key(n, stack, anchors=True)) == saved
