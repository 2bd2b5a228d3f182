"""Which tensors are decoder layers, on the architectures transformers ships, against a
reference that does not use lazymerge's names: tiny random models built from
transformers' own config classes, PEFT's `merge_and_unload` for the other's LoRA, and
each tensor's decoder layer read from the module tree (the parameter objects inside the
decoder's `layers`/`h` ModuleList), never from a tensor's name.

Saved names and module names differ (transformers 5 saves Gemma 3 under the older
`language_model.model.*` names while its modules are `model.language_model.*`), so a saved
tensor is tied to its parameter by value: every parameter is perturbed at random, which
makes each one unique.

Mixture-of-experts models keep their experts in memory as one stacked (and for gate/up
fused) parameter per layer, `mlp.experts.gate_up_proj` [experts, 2 * inter, hidden], and
transformers saves them per expert (`mlp.experts.<e>.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.<e>.w1.weight`): such a saved tensor is tied by value to its
block of the stacked parameter. Tied embeddings are one parameter under two module names;
the checkpoint holds it once, as the input embedding, and so must the output.

Gemma 3's adapter as PEFT saves it today names its modules as in memory
(`model.language_model.layers.N...`) where the checkpoint has
`language_model.model.layers.N...`: lazymerge maps the names (and `plan` says so). The same
merge with the adapter's modules under the saved names (as PEFT wrote them before
transformers 4.52) needs no mapping.

A LoRA on tied embeddings (llama_tied_embed_lora): PEFT's merge changes the one parameter,
so its lm_head follows embed_tokens; the checkpoint and the output hold embed_tokens only.

The natural order (the output's, and the one tensor-mode gradients spread their anchors
over) is the module tree's `state_dict()` order of each saved tensor's parameter; a saved
expert, a block of a stacked parameter, goes with its expert: the experts in number order,
each expert's blocks in the order of the parameters they sit in (gate before up, as
gate_up_proj fuses them; then down_proj).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lazymerge.plan.build import build_plan
from lazymerge.recipe.parse import load_recipe

from conftest import error_of, load_merged, run_cli

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
    changed: int  # tensors the gradient changes (r > 0): layers 0..N-2's, and any `rest`
    tower: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    towers: tuple[str, ...] = ()  # the other numbered stacks, as `plan` names them
    lora: tuple[tuple[str, object], ...] = ()  # more LoraConfig arguments
    tied: bool = False  # the output head is the input embedding (one parameter, saved once)
    rest: float = 0.0  # the gradient's ratio outside the decoder layers
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


# The text-only families: transformers' own config class, tiny, token ids in the vocabulary.
TEXT = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": N_LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
GEMMA = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 16}
QWEN_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def text_config(name: str, **extra: object) -> Any:
    import transformers

    return getattr(transformers, name)(**{**TEXT, **extra})


def text_arch(
    config: str, model: str, targets: tuple[str, ...], changed: int,
    settings: dict[str, object], **kw: Any,
) -> Arch:  # fmt: skip
    """A text-only model (`settings` over TEXT) whose decoder is `model.layers`, saved
    under the same name."""
    return Arch(
        partial(text_config, config, **settings), model, lambda m: m.model.layers, targets,
        "model.layers", changed=changed, **kw,
    )  # fmt: skip


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEOX_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
UNTIED = {"tie_word_embeddings": False}
TIED = {"tie_word_embeddings": True}
ARCHS = {
    "llama": Arch(
        llama_config, "LlamaForCausalLM", lambda m: m.model.layers, LLAMA_TARGETS,
        "model.layers", changed=2 * 9,
    ),
    # Conv1D keeps its weight as [in, out]: PEFT needs fan_in_fan_out for it.
    "gpt2": Arch(
        gpt2_config, "GPT2LMHeadModel", lambda m: m.transformer.h, ("c_attn", "c_proj", "c_fc"),
        "transformer.h", changed=2 * 12, lora=(("fan_in_fan_out", True),), tied=True,
    ),
    "falcon": Arch(
        falcon_config, "FalconForCausalLM", lambda m: m.transformer.h, NEOX_TARGETS,
        "transformer.h", changed=2 * 6, tied=True,
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
        tower=lambda m: m.model.vision_tower, towers=("vision_tower.encoder.layers",), tied=True,
    ),
    # changed: each decoder layer's saved tensors, in the two layers the gradient blends.
    "mistral": text_arch(
        "MistralConfig", "MistralForCausalLM", LLAMA_TARGETS, 2 * 9, settings=UNTIED
    ),
    "qwen2": text_arch(  # + q/k/v_proj biases
        "Qwen2Config", "Qwen2ForCausalLM", LLAMA_TARGETS, 2 * 12, settings=UNTIED
    ),
    "qwen3": text_arch(  # + q_norm, k_norm
        "Qwen3Config", "Qwen3ForCausalLM", LLAMA_TARGETS, 2 * 11,
        settings={**UNTIED, "head_dim": 8},
    ),
    # Gemma's norms are saved as offsets from 1 and its embeddings scaled in forward: the
    # saved tensors are what is blended, whatever the model does with them.
    "gemma2": text_arch(  # + pre/post_feedforward_layernorm
        "Gemma2Config", "Gemma2ForCausalLM", LLAMA_TARGETS, 2 * 11, settings={**GEMMA, **TIED},
        tied=True,
    ),
    "gemma3_text": text_arch(  # + q_norm, k_norm
        "Gemma3TextConfig", "Gemma3ForCausalLM", LLAMA_TARGETS, 2 * 13,
        settings={**GEMMA, **TIED}, tied=True,
    ),
    "phi3": text_arch(  # fused qkv_proj and gate_up_proj
        "Phi3Config", "Phi3ForCausalLM", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        2 * 6, settings=UNTIED,
    ),
    # MoE: the LoRA on the attention only; each layer saves its router and 4 experts x 3.
    "mixtral": text_arch(
        "MixtralConfig", "MixtralForCausalLM", ATTENTION, 2 * 19,
        settings={**UNTIED, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": text_arch(  # + a shared expert and its gate, q/k/v_proj biases
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", ATTENTION, 2 * 26,
        settings={**UNTIED, **QWEN_MOE, "shared_expert_intermediate_size": 32},
    ),
    "qwen3_moe": text_arch(  # + q_norm, k_norm
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ATTENTION, 2 * 21,
        settings={**UNTIED, **QWEN_MOE, "head_dim": 8},
    ),
    "olmo2": text_arch(  # q/k_norm; norms after attention and MLP, none before
        "Olmo2Config", "Olmo2ForCausalLM", LLAMA_TARGETS, 2 * 11, settings=UNTIED
    ),
    "starcoder2": text_arch(  # LayerNorms and linear layers, all with biases
        "Starcoder2Config", "Starcoder2ForCausalLM", (*ATTENTION, "c_fc", "c_proj"), 2 * 16,
        settings=TIED, tied=True,
    ),
    "cohere": text_arch(  # parallel attention and MLP: one (bias-free) LayerNorm a layer
        "CohereConfig", "CohereForCausalLM", LLAMA_TARGETS, 2 * 8, settings=TIED, tied=True
    ),
    "llama_tied": text_arch(
        "LlamaConfig", "LlamaForCausalLM", LLAMA_TARGETS, 2 * 9, settings=TIED, tied=True
    ),
}  # fmt: skip
ARCHS["gemma3_saved_names_adapter"] = replace(ARCHS["gemma3"], saved_names_adapter=True)
# An embedding LoRA (lora_embedding_A/B; PEFT also saves embed_tokens.base_layer.weight) on
# the tied embeddings. With `rest` the other's embed_tokens (and final norm) count.
ARCHS["llama_tied_embed_lora"] = replace(
    ARCHS["llama_tied"], targets=(*LLAMA_TARGETS, "embed_tokens"), rest=0.5, changed=2 * 9 + 2
)


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
    lora_changed: set[str]  # saved names of the other's tensors PEFT's merge changed
    targeted: set[str]  # saved names of the weights of the modules the LoRA targets
    tied: bool  # the module tree's output head is its input embedding
    order: list[str]  # the saved names in the module tree's state_dict() order


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


Index = tuple[int | slice, ...]


def blocks(p: torch.Tensor, shape: torch.Size) -> Iterator[Index]:
    """Where a tensor of `shape` can sit in parameter `p`: p itself, or one expert's
    block of a stacked expert parameter (p[e], or one of the equal parts p[e] fuses, as
    gate_up_proj fuses gate_proj and up_proj)."""
    if p.shape == shape:
        yield ()
    elif p.ndim == len(shape) + 1:
        for e in range(p.shape[0]):
            inner = p.shape[1:]
            if inner == shape:
                yield (e,)
                continue
            for d, (n, size) in enumerate(zip(inner, shape, strict=True)):
                same = inner[:d] == shape[:d] and inner[d + 1 :] == shape[d + 1 :]
                if same and n % size == 0:
                    for k in range(0, n, size):
                        yield (e, *[slice(None)] * d, slice(k, k + size))


def located(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[str, Index]]:
    """Saved name -> the module-tree name of the parameter holding the same values, and
    where in it (() for the whole parameter)."""
    params = list(model.state_dict().items())
    where = {}
    for key, t in tensors.items():
        found = [(n, i) for n, p in params for i in blocks(p, t.shape) if torch.equal(p[i], t)]
        # Tied weights are one parameter under two names (embeddings and lm_head): the
        # first name in the module tree's order, the embeddings'.
        objects = {(id(model.get_parameter(n)), repr(i)) for n, i in found}
        assert len(objects) == 1, f"{key}: matches {found}"
        where[key] = found[0]
    return where


def state_dict_order(model: torch.nn.Module, where: dict[str, tuple[str, Index]]) -> list[str]:
    """The saved names in the order of their parameters in the module tree's state_dict();
    blocks of a stacked expert parameter by expert, then parameter, then part."""
    names = list(model.state_dict(keep_vars=True))
    position = {name: i for i, name in enumerate(names)}

    def key(saved_name: str) -> tuple[int, ...]:
        name, index = where[saved_name]
        if index == ():
            return (position[name],)
        module = name.rpartition(".")[0]
        first = min(position[n] for n in names if n.startswith(module + "."))
        part = index[-1].start if isinstance(index[-1], slice) else 0
        assert isinstance(index[0], int)
        return (first, index[0], position[name], part)

    return sorted(where, key=key)


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
    where = located(model, base)
    names = {key: name for key, (name, _) in where.items()}
    in_decoder = owners(model, dict(enumerate(arch.decoder(model))))
    layer = {key: in_decoder[names[key]] for key in base}
    in_tower_tree = owners(model, {0: arch.tower(model)} if arch.tower is not None else {})
    in_tower = {key for key in base if in_tower_tree[names[key]] is not None}
    other = saved(root / "other")
    merged = peft_merge(arch, root / "other", lora)
    assert set(other) == set(base)
    expected = {}
    for key, b in base.items():
        name, index = where[key]
        o = merged[name][index]
        r = ratio(arch, layer[key])
        expected[key] = ((1 - r) * b.float() + r * o.float()).to(torch.float16)
    # What the LoRA changed in the other: a tower blended, or an expert changed, shows.
    lora_changed = {k for k in base if not torch.equal(merged[names[k]][where[k][1]], other[k])}
    targeted = {
        k
        for k, (name, index) in where.items()
        if index == () and name.endswith(".weight") and name.split(".")[-2] in arch.targets
    }
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if arch.saved_names_adapter:
        lora = rename_adapter(lora, root / "lora_saved_names", names)
    gradient = {"values": VALUES} | ({"rest": arch.rest} if arch.rest else {})
    recipe = write_recipe(
        root / "recipe.yaml", root / "base", root / "other", lora, gradient=gradient
    )
    error = cli_error("merge", recipe, "-o", root / "out", "-q")
    return Case(
        arch, root, recipe, root / "out", error, base, expected, layer, in_tower,
        lora_changed, targeted, tied, state_dict_order(model, where),
    )  # fmt: skip


def ratio(arch: Arch, layer: int | None) -> float:
    """The gradient's ratio of the other for a tensor in decoder layer `layer` (None: not
    in the decoder's layers)."""
    return arch.rest if layer is None else float(RATIOS[layer])


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
    blended = {key for key, i in case.layer.items() if ratio(case.arch, i) > 0}
    assert len(blended) == case.arch.changed
    changed = {key for key, b in case.base.items() if not same_bytes(ours[key], b.half())}
    assert changed == blended
    if case.arch.tower is not None:  # q, k, v_proj of each of the tower's 2 layers
        assert len(case.lora_changed & case.in_tower) == 2 * 3
    for key in case.in_tower:  # the base's tower, whatever the other's LoRA did to its own
        assert same_bytes(ours[key], case.base[key].half()), key


def test_lora_changes_exactly_its_targets(case: Case) -> None:
    """The reference's other, PEFT-merged, differs from the saved other in the weights of
    the modules the LoRA targets (every layer's, and a tower's), and nowhere else: not in
    a MoE's experts or router, nor in a bias or a norm."""
    assert case.targeted
    assert case.lora_changed == case.targeted
    in_layers = {case.layer[k] for k in case.targeted} - {None}
    assert in_layers == set(range(N_LAYERS))


def test_tied_embeddings_are_saved_once(case: Case) -> None:
    """A tied head (the module tree's output embedding is its input embedding) is saved
    once, as the input embedding; the output has no head of its own, and ties on load."""
    assert case.tied == case.arch.tied
    ours = load_merged(output(case))
    heads = {k for k in ours if k.endswith(("lm_head.weight", "embed_out.weight"))}
    if case.arch.tied:
        assert not {k for k in case.base if k.endswith("lm_head.weight")}
        assert not heads, heads
        model = model_class(case.arch).from_pretrained(output(case))
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        assert len(heads) == 1, heads


def test_output_loads_with_no_missing_or_unexpected_keys(case: Case) -> None:
    _, info = model_class(case.arch).from_pretrained(output(case), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_natural_order_is_the_state_dict_order(case: Case) -> None:
    """The plan's tensors (the output's order, and tensor mode's) in the module tree's
    state_dict() order, the family's from its config.json model_type."""
    assert [t.name for t in build_plan(load_recipe(case.recipe)).tensors] == case.order


def blockmerge_tensors_ratios(values: list[float], n: int) -> list[float]:
    """BlockMerge_Gradient_Tensors' arithmetic, longhand: n // sections tensors a section,
    each section a linspace between its two anchors, the remainder at the last anchor."""
    if len(values) == 1:
        return [values[0]] * n
    per_section = n // (len(values) - 1)
    ratios: list[float] = []
    for i in range(len(values) - 1):
        ratios += np.linspace(values[i], values[i + 1], per_section).tolist()
    return ratios + [values[-1]] * (n - len(ratios))


def test_tensor_mode_spreads_its_anchors_in_state_dict_order(
    built: dict[str, Case], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """GPT-2, whose order is not Llama's (wpe before the layers; ln_1, attn, ln_2, mlp):
    tensor mode over the module tree's state_dict() order."""
    gpt2 = get_case(built, tmp_path_factory, "gpt2")
    values = [0.9, 0.5, 0.1, 0.5]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({
            "base": str(gpt2.root / "base"), "other": str(gpt2.root / "other"),
            "gradient": {"over": "tensors", "values": values}, "output": {"dtype": "float32"},
        })
    )  # fmt: skip
    assert run_cli("merge", recipe, "-o", tmp_path / "out", "-q") == 0
    expected = dict(
        zip(gpt2.order, blockmerge_tensors_ratios(values, len(gpt2.order)), strict=True)
    )
    assert gpt2.order[:3] == [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"
    ]  # fmt: skip
    manifest = json.loads((tmp_path / "out" / "lazymerge.json").read_text())["tensors"]
    ours, other = load_merged(tmp_path / "out"), saved(gpt2.root / "other")
    for name, r in expected.items():
        assert manifest[name]["ratio"] == pytest.approx(r, abs=1e-12), name
        want = (1 - r) * gpt2.base[name] + r * other[name]
        torch.testing.assert_close(ours[name], want, rtol=0, atol=1e-6)


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
