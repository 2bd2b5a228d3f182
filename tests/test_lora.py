from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import load_merged, make_adapter, peft_merge, run_cli

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


@pytest.fixture
def small(tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = {
        f"{Q}.weight": torch.randn(8, 6),
        f"{V}.weight": torch.randn(4, 6),
        "model.norm.weight": torch.randn(6),
    }
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    return base


def adapter(
    directory: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    name: str = "",
    **config: object,
) -> Path:
    directory.mkdir()
    seg = f".{name}" if name else ""
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A{seg}.weight"] = a
        tensors[f"base_model.model.{module}.lora_B{seg}.weight"] = b
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def factors(out: int, inp: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, inp), torch.randn(out, r)


def expected(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    return (w.double() + k * (b.double() @ a.double())).float()


def test_delta_is_weight_times_scale_times_b_at_a(tmp_path: Path, small: dict) -> None:  # type: ignore[type-arg]
    a, b = factors(8, 6, 2)
    ad = adapter(tmp_path / "ad", {Q: (a, b)}, lora_alpha=4)
    assert (
        run_cli("lora", tmp_path / "base", ad, "--weight", "0.25", "-o", tmp_path / "out", "-q")
        == 0
    )
    out = load_merged(tmp_path / "out")
    torch.testing.assert_close(
        out[f"{Q}.weight"], expected(small[f"{Q}.weight"], a, b, 0.25 * 4 / 2)
    )
    assert torch.equal(out[f"{V}.weight"], small[f"{V}.weight"])  # untouched: copied bytes
    assert torch.equal(out["model.norm.weight"], small["model.norm.weight"])


def test_rslora_scale_and_adapter_name_segment(tmp_path: Path, small: dict) -> None:  # type: ignore[type-arg]
    a, b = factors(8, 6, 4)
    ad = adapter(tmp_path / "ad", {Q: (a, b)}, name="default", r=4, lora_alpha=3, use_rslora=True)
    assert run_cli("lora", tmp_path / "base", ad, "-o", tmp_path / "out", "-q") == 0
    out = load_merged(tmp_path / "out")
    torch.testing.assert_close(
        out[f"{Q}.weight"], expected(small[f"{Q}.weight"], a, b, 3 / math.sqrt(4))
    )


def test_rank_and_alpha_patterns(tmp_path: Path, small: dict) -> None:  # type: ignore[type-arg]
    qa, qb = factors(8, 6, 2)
    va, vb = factors(4, 6, 3)  # rank_pattern gives v_proj r=3; the tensors say so too
    ad = adapter(
        tmp_path / "ad", {Q: (qa, qb), V: (va, vb)},
        r=2, lora_alpha=4, rank_pattern={"v_proj": 3}, alpha_pattern={"v_proj": 9},
    )  # fmt: skip
    assert run_cli("lora", tmp_path / "base", ad, "-o", tmp_path / "out", "-q") == 0
    out = load_merged(tmp_path / "out")
    torch.testing.assert_close(out[f"{Q}.weight"], expected(small[f"{Q}.weight"], qa, qb, 4 / 2))
    torch.testing.assert_close(out[f"{V}.weight"], expected(small[f"{V}.weight"], va, vb, 9 / 3))


def test_several_loras_add(tmp_path: Path, small: dict) -> None:  # type: ignore[type-arg]
    a1, b1 = factors(8, 6, 2)
    a2, b2 = factors(8, 6, 2)
    adapter(tmp_path / "one", {Q: (a1, b1)})
    adapter(tmp_path / "two", {Q: (a2, b2)})
    recipe = {
        "base": {
            "model": "base",
            "loras": [{"path": "one", "weight": 0.5}, {"path": "two", "weight": -1}],
        }
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q") == 0
    w = small[f"{Q}.weight"].double()
    want = w + 0.5 * 2 * (b1.double() @ a1.double()) - 2 * (b2.double() @ a2.double())
    torch.testing.assert_close(load_merged(tmp_path / "out")[f"{Q}.weight"], want.float())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda d: adapter(d, {"model.layers.9.mlp.up_proj": factors(8, 6, 2)}),
         "targets model.layers.9.mlp.up_proj.weight, which"),
        (lambda d: adapter(d, {Q: factors(8, 5, 2)}),
         "is [8, 5] but model.layers.0.self_attn.q_proj.weight in"),
        (lambda d: adapter(d, {Q: (torch.randn(2, 6), torch.randn(8, 3))}),
         "rank mismatch for model.layers.0.self_attn.q_proj: lora_A is [2, 6], lora_B is [8, 3]"),
        (lambda d: adapter(d, {Q: factors(8, 6, 2)}, use_dora=True), "use_dora is set but model.layers.0.self_attn.q_proj.weight has no lora_magnitude_vector"),
        (lambda d: adapter(d, {Q: factors(8, 6, 2)}, fan_in_fan_out=True), "is [6, 8] but model.layers.0.self_attn.q_proj.weight"),
        (lambda d: adapter(d, {Q: factors(8, 6, 2)}, init_lora_weights="pissa_niter_4"),
         "changes the base model during training"),
        (lambda d: adapter(d, {Q: factors(8, 6, 2)}, peft_type="IA3"), "is not a LoRA adapter"),
    ],
)  # fmt: skip
def test_adapter_errors(
    tmp_path: Path,
    small: dict,
    capsys: pytest.CaptureFixture[str],
    build: object,
    message: str,  # type: ignore[type-arg]
) -> None:
    ad = build(tmp_path / "ad")  # type: ignore[operator]
    assert run_cli("lora", tmp_path / "base", ad, "-o", tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_adapter_with_unsupported_tensor_kind(
    tmp_path: Path, small: dict, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[type-arg]
    ad = adapter(tmp_path / "ad", {Q: factors(8, 6, 2)})
    t = load_file(str(ad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.scaling"] = torch.zeros(2, 3)
    save_file(t, str(ad / "adapter_model.safetensors"))
    assert run_cli("lora", tmp_path / "base", ad, "-o", tmp_path / "out", "-q") == 1
    assert "q_proj.scaling' is not a LoRA, DoRA or saved-module weight" in capsys.readouterr().err


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_lora_equals_peft_merge_and_unload(
    models: dict[str, Path], tmp_path: Path, weight: float
) -> None:
    out = tmp_path / "out"
    assert (
        run_cli("lora", models["other"], models["lora"], "--weight", str(weight), "-o", out, "-q")
        == 0
    )
    ours = load_merged(out)
    ref = peft_merge(models["other"], models["lora"], weight)
    assert set(ours) == set(ref)
    changed = 0
    for name, r in ref.items():
        torch.testing.assert_close(ours[name], r, rtol=1e-6, atol=1e-7)
        changed += "proj" in name
    assert changed == 7 * 8
    # The adapter really moved the weights, so equality above is not trivial.
    base = load_merged(models["other"])
    assert not torch.allclose(base[f"{Q}.weight"], ours[f"{Q}.weight"], atol=1e-4)


def test_rslora_and_patterns_equal_peft(models: dict[str, Path], tmp_path: Path) -> None:
    ad = make_adapter(
        models["other"], tmp_path / "ad", seed=5, use_rslora=True,
        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3},
    )  # fmt: skip
    out = tmp_path / "out"
    assert run_cli("lora", models["other"], ad, "--weight", "0.5", "-o", out, "-q") == 0
    ours = load_merged(out)
    for name, r in peft_merge(models["other"], ad, 0.5).items():
        torch.testing.assert_close(ours[name], r, rtol=1e-6, atol=1e-7)
