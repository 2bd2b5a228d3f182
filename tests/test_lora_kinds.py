"""Every kind of PEFT adapter, merged by lazymerge and by PEFT's own merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import LORA_TARGETS, load_merged, peft_merge, run_cli


def llama(directory: Path, seed: int, **changes: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **changes,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def train(
    model_dir: Path, out: Path, seed: int, adapter_name: str = "default", **lora: object
) -> Path:
    """A PEFT adapter whose every trainable tensor has moved away from its start."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(init_lora_weights=False, **lora), adapter_name=adapter_name
    )  # type: ignore[arg-type]
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # biases, magnitudes, saved modules: as training would
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def merged_by_lazymerge(
    model: Path, adapter: Path, out: Path, weight: float
) -> dict[str, torch.Tensor]:
    assert run_cli("lora", model, adapter, "--weight", str(weight), "-o", out, "-q") == 0
    return load_merged(out)


def assert_equal_to_peft(
    model: Path, adapter: Path, out: Path, weight: float, peft_dir: Path | None = None
) -> None:
    ours = merged_by_lazymerge(model, adapter, out, weight)
    ref = peft_merge(model, peft_dir or adapter, weight)
    ref = {k: v for k, v in ref.items() if k in ours or "lm_head" not in k}  # tied heads
    assert set(ours) == set(ref)
    base = load_merged(model)
    changed = [k for k in ref if not torch.equal(base[k], ref[k])]
    assert changed  # the adapter really changes something
    for name, r in ref.items():
        torch.testing.assert_close(ours[name], r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_embedding_lora(tmp_path: Path, weight: float) -> None:
    model = llama(tmp_path / "m", 1)
    adapter = train(
        model, tmp_path / "a", 2, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]
    )
    assert_equal_to_peft(model, adapter, tmp_path / "out", weight)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_fan_in_fan_out_gpt2(tmp_path: Path, weight: float) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=80, n_positions=64)
    ).save_pretrained(tmp_path / "gpt2")
    adapter = train(
        tmp_path / "gpt2",
        tmp_path / "a",
        4,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
    )
    assert_equal_to_peft(tmp_path / "gpt2", adapter, tmp_path / "out", weight)


def test_modules_to_save_and_trained_biases(tmp_path: Path) -> None:
    model = llama(tmp_path / "m", 5, attention_bias=True)
    adapter = train(
        model, tmp_path / "a", 6, r=4, lora_alpha=8, target_modules=LORA_TARGETS,
        modules_to_save=["lm_head"], bias="lora_only",
    )  # fmt: skip
    assert_equal_to_peft(model, adapter, tmp_path / "out", 1.0)


def test_replacements_interpolate_with_the_weight(tmp_path: Path) -> None:
    """PEFT has no weight for saved modules; lazymerge's rule: W + w (S - W)."""
    from safetensors.torch import load_file

    model = llama(tmp_path / "m", 5, attention_bias=True)
    adapter = train(
        model,
        tmp_path / "a",
        6,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    ours = merged_by_lazymerge(model, adapter, tmp_path / "out", 0.25)
    saved = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    base = load_merged(model)["lm_head.weight"]
    torch.testing.assert_close(
        ours["lm_head.weight"], base + 0.25 * (saved - base), rtol=1e-6, atol=1e-7
    )


def test_dora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = llama(tmp_path / "m", 7)
    adapter = train(
        model, tmp_path / "a", 8, r=4, lora_alpha=8, target_modules=LORA_TARGETS, use_dora=True
    )
    assert_equal_to_peft(model, adapter, tmp_path / "out", 1.0)
    capsys.readouterr()
    assert run_cli("lora", model, adapter, "--weight", "0.5", "-o", tmp_path / "half", "-q") == 1
    assert "a DoRA adapter is exact only at weight 1 (got 0.5)" in capsys.readouterr().err


def test_adapter_saved_under_its_own_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = llama(tmp_path / "m", 9)
    train(
        model,
        tmp_path / "a",
        10,
        adapter_name="limarp",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    assert (tmp_path / "a" / "limarp" / "adapter_config.json").is_file()
    assert_equal_to_peft(
        model, tmp_path / "a", tmp_path / "out", 1.0, peft_dir=tmp_path / "a" / "limarp"
    )
    train(
        model,
        tmp_path / "a",
        11,
        adapter_name="second",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
    )
    capsys.readouterr()
    assert run_cli("lora", model, tmp_path / "a", "-o", tmp_path / "two", "-q") == 1
    assert "holds several adapters (limarp, second); name one of them" in capsys.readouterr().err
