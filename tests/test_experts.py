"""LoRAs on fused expert parameters (PEFT `target_parameters`), merged by lazymerge and by
PEFT's own merge_and_unload: on checkpoints that store the experts one by one (Mixtral,
Qwen2-MoE, as transformers saves them), and on ones that store them fused as 3-D tensors --
gpt-oss as transformers saves it, (E, in, out), and a Mixtral saved from memory,
(E, out, in)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lazymerge.meaning.adapters import LORA_X, LORA_XT, LoraAdapter
from lazymerge.plan.build import build_plan
from lazymerge.read.checkpoint import CheckpointIndex
from lazymerge.recipe.parse import load_recipe

from conftest import error_of, load_merged, peft_merge, run_cli

WEIGHT = 0.25  # the other's LoRA
RATIOS = [0.9, 0.0]  # the gradient over the 2 layers; everything else is the base's
INTERMEDIATE = 48


def mixtral(directory: Path, seed: int, experts: int = 4) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(directory)
    return directory


def qwen2_moe(directory: Path, seed: int, experts: int = 4) -> Path:
    """Saved per expert as `mlp.experts.<e>.gate_proj/up_proj/down_proj.weight`, next to
    a plain (unfused) `mlp.shared_expert.*` MLP and `mlp.shared_expert_gate`."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=INTERMEDIATE,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2MoeForCausalLM(config).save_pretrained(directory)
    return directory


# The shared expert's plain Linears, a LoRA's ordinary target_modules next to the fused ones.
SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]


def expert_lora(model_dir: Path, out: Path, seed: int, modules: list[str] | None = None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=2, lora_alpha=6, init_lora_weights=False, target_modules=modules or [],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(out)  # type: ignore[arg-type]
    return out


def in_memory(merged: dict[str, torch.Tensor], saved: str) -> torch.Tensor:
    """The saved tensor `saved`, cut from a model's in-memory (fused) state dict."""
    m = re.match(
        r"(.+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
        r"(w[123]|gate_proj|up_proj|down_proj)\.weight$",
        saved,
    )
    if m is None:
        return merged[saved.replace(".block_sparse_moe.", ".mlp.")]
    layer, e, w = m[1], int(m[2]), m[3]
    if w in ("w2", "down_proj"):
        return merged[f"{layer}.mlp.experts.down_proj"][e]
    rows = slice(0, INTERMEDIATE) if w in ("w1", "gate_proj") else slice(INTERMEDIATE, None)
    return merged[f"{layer}.mlp.experts.gate_up_proj"][e, rows]


def ratio(name: str) -> float:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return RATIOS[int(m[1])] if m else 0.0


def within_one_ulp(ours: torch.Tensor, want: torch.Tensor) -> bool:
    up = torch.nextafter(want, torch.tensor(float("inf"), dtype=want.dtype))
    down = torch.nextafter(want, torch.tensor(float("-inf"), dtype=want.dtype))
    return bool(((ours == want) | (ours == up) | (ours == down)).all())


def cli_error(*args: object) -> str:
    with redirect_stderr(io.StringIO()) as err:
        rc = run_cli(*args)  # type: ignore[arg-type]
    assert rc in (0, 1)
    return err.getvalue()


@pytest.mark.parametrize(
    ("family", "modules", "also_changed"),
    [
        pytest.param(mixtral, None, [], id="mixtral"),
        # The shared expert is targeted too (ordinary target_modules beside target_parameters).
        pytest.param(qwen2_moe, SHARED, SHARED, id="qwen2_moe"),
    ],
)
def test_expert_lora_matches_peft(
    tmp_path: Path, family: Callable[..., Path], modules: list[str] | None, also_changed: list[str]
) -> None:
    base = family(tmp_path / "base", 1)
    other = family(tmp_path / "other", 2)
    lora = expert_lora(other, tmp_path / "lora", 3, modules)
    recipe = {
        "base": str(base),
        "other": {"model": str(other), "loras": [{"path": str(lora), "weight": WEIGHT}]},
        "gradient": {"values": RATIOS},
        "output": {"dtype": "float16"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_error("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q") == ""

    ours, b, o = load_merged(tmp_path / "out"), load_merged(base), load_merged(other)
    merged = peft_merge(other, lora, WEIGHT)
    assert set(ours) == set(b)
    changed = set()
    for name, w in b.items():
        r = ratio(name)
        want = ((1 - r) * w.float() + r * in_memory(merged, name).float()).half()
        assert within_one_ulp(ours[name], want), name
        plain = ((1 - r) * w.float() + r * o[name].float()).half()
        if not torch.equal(ours[name], plain):
            changed.add(name)
    # w1, w2, w3 (gate, down, up) of every expert of layer 0 (layer 1 is the base's), and
    # whatever else the LoRA targets there
    experts = {n for n in changed if re.search(r"\.experts\.\d+\.", n)}
    assert len(experts) == 3 * 4
    assert changed - experts == {f"model.layers.0.mlp.{m}.weight" for m in also_changed}


def test_experts_the_checkpoint_lacks(tmp_path: Path) -> None:
    base = mixtral(tmp_path / "base", 1)
    lora = expert_lora(mixtral(tmp_path / "eight", 2, experts=8), tmp_path / "lora", 3)
    error = cli_error("lora", base, lora, "-o", tmp_path / "out", "-q")
    assert error.count("\n") == 1
    assert "is expert 4 of model.layers.0.mlp.experts" in error
    assert "has no model.layers.0.block_sparse_moe.experts.4.w" in error


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"]])
def test_one_fused_parameter(tmp_path: Path, targets: list[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = mixtral(tmp_path / "base", 1)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=4, use_rslora=True, init_lora_weights=False, target_modules=[],
        target_parameters=targets,
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(tmp_path / "lora")  # type: ignore[arg-type]
    assert cli_error("lora", base, tmp_path / "lora", "-o", tmp_path / "out", "-q") == ""
    ours, merged = load_merged(tmp_path / "out"), peft_merge(base, tmp_path / "lora", 1.0)
    for name, w in ours.items():
        torch.testing.assert_close(w, in_memory(merged, name), rtol=1e-5, atol=1e-6, msg=name)


def fused_mixtral(tmp_path: Path) -> Path:
    """A Mixtral saved from memory: experts fused, (E, out, in) -- gate_up_proj [4, 96, 32]."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = mixtral(tmp_path / "per_expert", 1)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((base / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors"
    )
    return fused


def test_fused_out_in_checkpoint_matches_peft(tmp_path: Path) -> None:
    """The base's own LoRA at WEIGHT (`loras:`) on experts stored (E, out, in)."""
    fused = fused_mixtral(tmp_path)
    lora = expert_lora(tmp_path / "per_expert", tmp_path / "lora", 3)
    recipe = {
        "base": {"model": str(fused), "loras": [{"path": str(lora), "weight": WEIGHT}]},
        "output": {"dtype": "float16"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    adapter, _ = LoraAdapter.open(lora).fit(CheckpointIndex.open(fused))
    assert {t.kind for t in adapter.terms if t.experts} == {LORA_X}  # by the shapes
    assert cli_error("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q") == ""
    ours, b = load_merged(tmp_path / "out"), load_merged(fused)
    merged = peft_merge(tmp_path / "per_expert", lora, WEIGHT)  # in memory: the fused names
    assert set(ours) == set(b) == set(merged)
    for name, want in merged.items():
        assert within_one_ulp(ours[name], want.half()), name
    changed = {n for n in b if not torch.equal(ours[n], b[n].half())}
    assert changed == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in FUSED}


FUSED = ("gate_up_proj", "down_proj")
HIDDEN = 32  # gpt-oss's intermediate size is its hidden size: down_proj's experts are square


def gpt_oss(directory: Path, seed: int, experts: int = 4, intermediate: int = HIDDEN) -> Path:
    """Saved as transformers holds it: `mlp.experts.gate_up_proj` [E, H, 2I] (gate and up
    interleaved), `down_proj` [E, I, H], and their biases [E, 2I], [E, H]."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=96, hidden_size=HIDDEN, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=experts,
        num_experts_per_tok=2, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # biases and sinks initialise to zeros: make every tensor count
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt_oss_merge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt-oss base and other, the other's LoRA on its experts and attention at WEIGHT, a
    gradient over the layers (RATIOS)."""
    root = tmp_path_factory.mktemp("gpt_oss")
    base, other = gpt_oss(root / "base", 1), gpt_oss(root / "other", 2)
    lora = expert_lora(other, root / "lora", 3, ["q_proj", "o_proj"])
    recipe = {
        "base": str(base),
        "other": {"model": str(other), "loras": [{"path": str(lora), "weight": WEIGHT}]},
        "gradient": {"values": RATIOS},
        "output": {"dtype": "float16"},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_error("merge", root / "r.yaml", "-o", root / "out", "-q") == ""
    return root


def test_gpt_oss_checkpoint_stores_fused_3d_experts(gpt_oss_merge: Path) -> None:
    index = CheckpointIndex.open(gpt_oss_merge / "base")
    shapes = {n: r.shape for n, r in index.tensors.items() if ".experts." in n}
    assert shapes == {
        f"model.layers.{i}.mlp.experts.{name}": shape
        for i in (0, 1)
        for name, shape in [
            ("gate_up_proj", (4, HIDDEN, 2 * HIDDEN)), ("gate_up_proj_bias", (4, 2 * HIDDEN)),
            ("down_proj", (4, HIDDEN, HIDDEN)), ("down_proj_bias", (4, HIDDEN)),
        ]
    }  # fmt: skip
    # (E, in, out): gate_up_proj by its shape, the square down_proj by its family, as PEFT.
    adapter, _ = LoraAdapter.open(gpt_oss_merge / "lora").fit(index)
    kinds = {t.target: t.kind for t in adapter.terms if t.experts}
    assert kinds == {f"model.layers.{i}.mlp.experts.{p}": LORA_XT for i in (0, 1) for p in FUSED}


def test_gpt_oss_fused_experts_match_peft(gpt_oss_merge: Path) -> None:
    root = gpt_oss_merge
    ours, b, o = load_merged(root / "out"), load_merged(root / "base"), load_merged(root / "other")
    merged = peft_merge(root / "other", root / "lora", WEIGHT)
    assert set(ours) == set(b) == set(merged)
    changed = set()
    for name, w in b.items():
        r = ratio(name)
        want = ((1 - r) * w.float() + r * merged[name].float()).half()
        assert within_one_ulp(ours[name], want), name
        plain = ((1 - r) * w.float() + r * o[name].float()).half()
        if not torch.equal(ours[name], plain):
            changed.add(name)
    # layer 0's experts and attention LoRA targets (layer 1 is the base's), not the biases
    assert changed == {
        f"model.layers.0.{m}"
        for m in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                  "self_attn.q_proj.weight", "self_attn.o_proj.weight")
    }  # fmt: skip


def test_gpt_oss_output_loads_in_state_dict_order(gpt_oss_merge: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        gpt_oss_merge / "out", output_loading_info=True
    )
    model, info = loaded
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    plan = build_plan(load_recipe(gpt_oss_merge / "r.yaml"))
    assert [t.name for t in plan.tensors] == list(model.state_dict())
    for t in plan.tensors:
        m = re.match(r"model\.layers\.(\d+)\.", t.name)
        assert plan.stack.layer_of(t.name) == (int(m[1]) if m else None), t.name


def test_gpt_oss_tensor_mode(gpt_oss_merge: Path, tmp_path: Path) -> None:
    """Tensor mode spreads its anchors over gpt-oss's natural order, fused experts included."""
    root = gpt_oss_merge
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["gradient"] = {"over": "tensors", "values": [0.9, 0.1]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_error("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q") == ""
    manifest = yaml.safe_load((tmp_path / "out" / "lazymerge.json").read_text())["tensors"]
    names = [t.name for t in build_plan(load_recipe(tmp_path / "r.yaml")).tensors]
    ratios = [manifest[n]["ratio"] for n in names]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 0.9 and ratios[-1] == 0.1


def test_fused_experts_do_not_depend_on_the_block(
    gpt_oss_merge: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of one expert write the experts' bytes the whole-tensor block wrote."""
    from lazymerge.run import budget, rows

    monkeypatch.setattr(budget, "LORA_ROWS", 1)
    blocks, add = [], rows._add_experts

    def spy(acc: torch.Tensor, *args: Any) -> None:
        blocks.append(acc.shape[0])
        add(acc, *args)

    monkeypatch.setattr(rows, "_add_experts", spy)
    out = tmp_path / "out"
    assert run_cli("merge", gpt_oss_merge / "r.yaml", "-o", out, "-q", "--max-memory", "1") == 0
    assert set(blocks) == {1} and len(blocks) == 2 * 4  # layer 0's two tensors, 4 experts
    ours, whole = load_merged(out), load_merged(gpt_oss_merge / "out")
    for name in (n for n in whole if n.endswith(FUSED)):
        assert torch.equal(ours[name].view(torch.int16), whole[name].view(torch.int16)), name


def retyped(lora: Path, r: int) -> Path:
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "r": r}))
    return lora


@pytest.mark.parametrize(
    ("make_lora", "says"),
    [
        pytest.param(
            lambda d: retyped(expert_lora(gpt_oss(d / "m", 1), d / "lora", 3), 3),
            "lora_A is [8, 32], lora_B is [64, 8]; need [r·experts, in] and "
            "[out, r·experts] with r=3",
            id="rank",
        ),
        pytest.param(
            lambda d: expert_lora(gpt_oss(d / "m", 1, experts=8), d / "lora", 3),
            "are a rank-2 LoRA on 8 experts of [64, 32], which fits a [8, 64, 32] or "
            "[8, 32, 64] tensor, but model.layers.0.mlp.experts.gate_up_proj in ",
            id="experts",
        ),
        pytest.param(
            lambda d: expert_lora(gpt_oss(d / "m", 1, intermediate=16), d / "lora", 3),
            "on 4 experts of [32, 32], which fits a [4, 32, 32] tensor, but "
            "model.layers.0.mlp.experts.gate_up_proj in ",
            id="layout",
        ),
    ],
)
def test_bad_fused_expert_lora(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_lora: Callable[[Path], Path],
    says: str,
) -> None:
    base = gpt_oss(tmp_path / "base", 1)
    error = error_of(capsys, "lora", base, make_lora(tmp_path), "-o", tmp_path / "out", "-q")
    assert says in error
    assert not (tmp_path / "out").exists()
