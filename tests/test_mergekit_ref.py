"""The mergekit reference harness, proved on `linear` against a longhand of mergekit 0.1.5.

The longhand follows merge_methods/linear.py (`linear_merge`) and the cast points of
io/tasks.py (`LoadTensor`: inputs to `dtype`; `SaveTensor`: result to `out_dtype`); see
docs/methods.md. Exact equality: the longhand pins mergekit's arithmetic, not a tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_ref import Family, Mergekit, load_checkpoint, make_family

pytestmark = pytest.mark.mergekit

WEIGHTS = (0.2, 0.3, 0.5)  # the fine-tunes'
BASE_WEIGHT = 0.1  # the global weight: the only one the base_model gets (see below)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, Family]:
    root = tmp_path_factory.mktemp("mergekit-inputs")
    return {dtype: make_family(root, dtype) for dtype in (torch.float16, torch.bfloat16)}


def linear_config(family: Family, dtype: str | None, out_dtype: str | None) -> dict[str, object]:
    config: dict[str, object] = {
        "merge_method": "linear",
        "base_model": str(family.base),
        "models": [
            {"model": str(path), "parameters": {"weight": w}}
            for path, w in zip(family.finetunes, WEIGHTS, strict=True)
        ],
        "parameters": {"normalize": True, "weight": BASE_WEIGHT},
    }
    if dtype is not None:
        config["dtype"] = dtype
    if out_dtype is not None:
        config["out_dtype"] = out_dtype
    return config


def linear_longhand(
    inputs: list[dict[str, torch.Tensor]],
    weights: list[float],
    dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's linear, by hand: inputs rounded to `dtype` on load; then, whatever
    `dtype` is, an fp32 sum of fp32(w_i) * x_i in input order (one fused multiply-add per
    term), divided by the fp32 sum of the weights, rounded back to `dtype`, and cast once
    more to `out_dtype`."""
    coefficients = torch.tensor([weights], dtype=torch.float32)  # [groups, inputs]
    denominator = coefficients.sum(dim=1)
    merged = {}
    for name in inputs[0]:
        xs = [m[name] if dtype is None else m[name].to(dtype) for m in inputs]
        acc = torch.zeros(xs[0].shape, dtype=torch.float32)
        for x, c in zip(xs, coefficients[0], strict=True):
            # One rounding per term: torch's addcmul is a fused multiply-add (CPU
            # vector and tail paths alike); `acc + x * c` differs in ~1 element in 5.
            acc = torch.addcmul(acc, x.float(), c)
        y = (acc / denominator).to(xs[0].dtype)
        merged[name] = y if out_dtype is None else y.to(out_dtype)
    return merged


# (family dtype, config dtype, out_dtype). Each case is a mergekit-yaml process of its
# own (~6 s): the first runs on every run, the others rotate (tests/conftest.py).
CASES = [
    (torch.float16, "float16", None),
    pytest.param(torch.bfloat16, "bfloat16", "float16", marks=pytest.mark.rotating),
    # inputs rounded to bf16, then back to fp16
    pytest.param(torch.float16, "bfloat16", "float16", marks=pytest.mark.rotating),
]


@pytest.mark.parametrize(("family_dtype", "dtype", "out_dtype"), CASES)
def test_linear_matches_longhand_exactly(
    mergekit: Mergekit,
    families: dict[torch.dtype, Family],
    tmp_path: Path,
    family_dtype: torch.dtype,
    dtype: str,
    out_dtype: str | None,
) -> None:
    family = families[family_dtype]
    got = mergekit.run(linear_config(family, dtype, out_dtype), tmp_path / "out")

    # A base_model missing from `models` joins a linear merge as the last input, with
    # whatever weight the global parameters give it (mergekit plan.py normalize_config).
    inputs = [load_checkpoint(p) for p in (*family.finetunes, family.base)]
    want = linear_longhand(
        inputs,
        [*WEIGHTS, BASE_WEIGHT],
        getattr(torch, dtype),
        None if out_dtype is None else getattr(torch, out_dtype),
    )
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        assert torch.equal(got[name], w), f"{name}: max |diff| {(got[name] - w).abs().max()}"


@pytest.mark.rotating  # a mergekit-yaml process (~6 s) pinning mergekit's own refusal
def test_base_model_without_weight_is_an_error_in_linear(
    mergekit: Mergekit, families: dict[torch.dtype, Family], tmp_path: Path
) -> None:
    config = linear_config(families[torch.float16], "float16", None)
    config["parameters"] = {"normalize": True}
    with pytest.raises(AssertionError, match=r"Missing required parameter weight for .*base"):
        mergekit.run(config, tmp_path / "out")
