"""LoRAs on fused expert parameters (PEFT `target_parameters`) on a checkpoint that stores
experts one by one, merged by lazymerge and by PEFT's own merge_and_unload."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_merged, peft_merge, run_cli

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


def test_fused_3d_checkpoint_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = mixtral(tmp_path / "base", 1)
    lora = expert_lora(base, tmp_path / "lora", 3)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((base / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors"
    )
    error = cli_error("lora", fused, lora, "-o", tmp_path / "out", "-q")
    assert error.count("\n") == 1
    assert "stores the fused 3-D expert tensor model.layers.0.mlp.experts." in error
