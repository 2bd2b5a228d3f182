"""The cases of benchmarks.methods: each one's mergekit config, and how its output is
compared with mergekit's.

`ties` and `dare_ties` merge the base and three fine-tunes (`models:`); `slerp` and
`passthrough` are `slices:` configs over the base and the first fine-tune: the commonest
published SLERP shape (attention and MLP t gradients, 0.5 elsewhere) and a frankenmerge
stacking the two models' layers (2L layers out). Torch is imported inside the comparison
only: the orchestrator that reads these configs must not load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FINETUNES = 3
WEIGHTS = (0.5, 0.3, 0.2)
TIES_DENSITIES = (0.5, 0.3, 0.7)
DARE_DENSITY = 0.5
SEED = 42
CASES = ("ties", "dare_ties", "slerp", "passthrough")
# The SLERP config published with most slerp merges (mergekit's README example).
SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def case_config(models: Path, method: str, layers: int) -> dict[str, Any]:
    """The mergekit YAML of one case, on models/base and models/finetune-K (`layers` each)."""
    if method in ("slerp", "passthrough"):
        return slices_config(models, method, layers)
    densities = TIES_DENSITIES if method == "ties" else (DARE_DENSITY,) * FINETUNES
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(models / "base"),
        "models": [
            {"model": str(models / f"finetune-{k + 1}"), "parameters": {"weight": w, "density": d}}
            for k, (w, d) in enumerate(zip(WEIGHTS, densities, strict=True))
        ],
        "dtype": "float16",
    }
    if method == "dare_ties":
        # lazymerge reads it; mergekit ignores the key and gets --random-seed instead.
        cfg["random_seed"] = SEED
    return cfg


def slices_config(models: Path, method: str, layers: int) -> dict[str, Any]:
    """slerp: one slice, base and finetune-1 over all layers, t by filter; passthrough:
    two one-source slices, base's layers then finetune-1's (a 2L-layer frankenmerge)."""
    base, other = str(models / "base"), str(models / "finetune-1")
    sources = [{"model": m, "layer_range": [0, layers]} for m in (base, other)]
    if method == "passthrough":
        slices = [{"sources": [s]} for s in sources]
        return {"slices": slices, "merge_method": "passthrough", "dtype": "float16"}
    return {
        "slices": [{"sources": sources}],
        "merge_method": "slerp",
        "base_model": base,
        "parameters": {"t": SLERP_T},
        "dtype": "float16",
    }


def compared_inputs(cfg: dict[str, Any]) -> list[str]:
    """The inputs each output tensor is also read from: the base (the share of elements
    left equal to it) and, for TIES, the fine-tunes (its threshold ties). None for a
    passthrough: its output's later layers have no tensor of that name in any input."""
    method = cfg["merge_method"]
    if method == "passthrough":
        return []
    finetunes = [m["model"] for m in cfg["models"]] if method == "ties" else []
    return [cfg["base_model"], *finetunes]


def compare_outputs(lm: str, mk: str, config: str) -> dict[str, Any]:
    """lazymerge's output against mergekit's, tensor by tensor, in mergekit's fp16 ulps
    (tests/test_mergekit_methods.py's measure), and, where the output keeps the base's
    names, the share of elements each left equal to the base (every task vector there
    trimmed, dropped or out-voted; slerp's t = 0).

    For TIES, also which differing elements sit at a density threshold: where a task
    vector's magnitude equals the k-th largest, mergekit's unstable sort picks which
    survive and lazymerge keeps the lowest flat index; anywhere else they must agree.
    """
    import torch

    from benchmarks.compare import _locations

    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(config).read_text())
    ties = cfg["merge_method"] == "ties"
    densities = [m["parameters"]["density"] for m in cfg["models"]] if ties else []
    got_at, want_at = _locations(Path(lm)), _locations(Path(mk))
    inputs = [_locations(Path(p)) for p in compared_inputs(cfg)]
    names = sorted(set(got_at) & set(want_at))
    totals: dict[str, float] = {}
    for name in names:
        got, want, *others = (_tensor(p[name], name) for p in (got_at, want_at, *inputs))
        stats = _tensor_stats(got, want, others[0] if others else None)
        if ties:
            stats.update(_tie_stats(got, want, others[0], others[1:], densities))
        for key, value in stats.items():
            merge = max if key.startswith("max") else sum
            totals[key] = merge((totals.get(key, 0.0), value))
    only = {"only_lazymerge": sorted(set(got_at) - set(want_at)),
            "only_mergekit": sorted(set(want_at) - set(got_at))}  # fmt: skip
    return {"tensors": len(names), **_record(totals), **only}


def _record(totals: dict[str, float]) -> dict[str, Any]:
    """Summed counts as ints, maxima as they are, the base shares as fractions."""
    n = totals.pop("elements", 0.0)
    shares = {}
    if "same_lazymerge" in totals:
        shares["unchanged_lazymerge"] = totals.pop("same_lazymerge") / n
        shares["unchanged_mergekit"] = totals.pop("same_mergekit") / n
    counts = {k: v if k.startswith("max") else int(v) for k, v in totals.items()}
    return {"elements": int(n), **counts, **shares}


def _tensor(path: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


def _ulps(got: Any, want: Any) -> Any:
    import torch

    spacing = torch.finfo(torch.float16).eps * want.float().abs().clamp(min=2.0**-14)
    return (got.float() - want.float()).abs() / spacing


def _tensor_stats(got: Any, want: Any, base: Any | None) -> dict[str, float]:
    if got.shape != want.shape:
        raise ValueError(f"shapes {list(got.shape)} (lazymerge), {list(want.shape)} (mergekit)")
    ulps = _ulps(got, want)
    stats: dict[str, float] = {
        "elements": got.numel(),
        "max_abs_diff": float((got.float() - want.float()).abs().max()),
        "max_ulp": float(ulps.max()),
        "over_1_ulp": int((ulps > 1).sum()),
    }
    if base is not None:
        stats["same_lazymerge"] = int((got == base).sum())
        stats["same_mergekit"] = int((want == base).sum())
    return stats


def _tie_stats(
    got: Any, want: Any, base: Any, finetunes: list[Any], densities: list[float]
) -> dict[str, float]:
    """Elements at a threshold tie, and how the outputs differ off them."""
    import torch

    at_tie = torch.zeros(base.shape, dtype=torch.bool)
    for ft, density in zip(finetunes, densities, strict=True):
        mag = (ft - base).abs().float().flatten()  # the task vector in the merge's fp16
        keep = max(1, int(density * mag.numel()))
        threshold = mag.kthvalue(mag.numel() - keep + 1).values
        at_tie |= (mag == threshold).reshape(base.shape)
    ulps = _ulps(got, want)
    off_ties = ulps[~at_tie]
    return {
        "tie_elements": int(at_tie.sum()),
        "over_1_ulp_off_ties": int((off_ties > 1).sum()),
        "max_ulp_off_ties": float(off_ties.max()) if off_ties.numel() else 0.0,
    }
