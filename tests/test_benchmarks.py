"""The benchmark runner, kept from rotting: a few-MB smoke run, and the mergekit recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import mergekit
from benchmarks.runner import copy_baseline, span_for

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_records_every_figure(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "benchmarks", "--tiny", "--layers", "1,3", "--no-mergekit", "--warm", "--repeat", "2",
        "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    record = json.loads((tmp_path / "r.json").read_text())
    assert [r["layers"] for r in record["runs"]] == [1, 3]
    for r in record["runs"]:
        assert r["cache"] == "warm"
        assert r["bytes_read"] > r["bytes_written"] > 0
        assert 0 < r["merge_peak_rss"] < 2**31 and r["generator_peak_rss"] > 0
        assert r["merge_seconds"] > 0 and r["copy_seconds"] > 0 and r["startup_seconds"] > 0
        assert r["merge_over_copy"] == pytest.approx(r["merge_seconds"] / r["copy_seconds"])
        assert len(r["merge_runs"]) == len(r["copy_runs"]) == 2
        assert r["copy_read_seconds"] > 0 and r["copy_write_seconds"] > 0
        assert len(r["merge_cpu_runs"]) == 2 and all(c > 0 for c in r["merge_cpu_runs"])
        assert len(r["merge_steal_runs"]) == 2
        assert all(0 <= st <= 100 for st in r["merge_steal_runs"])  # Linux: /proc/stat says
        for runs, median in (
            (r["merge_runs"], r["merge_seconds"]),
            (r["copy_runs"], r["copy_seconds"]),
        ):
            assert min(runs) - 0.001 <= median <= max(runs) + 0.001  # the runs are rounded to ms
    assert "merge/copy" in done.stdout and "target peak RSS" in done.stdout
    assert "3 layers: merges " in done.stdout and "CPU-s, steal" in done.stdout
    assert not (tmp_path / "cache" / "layers-1").exists()  # cleaned up


def test_copy_baseline_reads_the_ranges_and_writes_the_sizes(tmp_path: Path) -> None:
    (tmp_path / "in.bin").write_bytes(bytes(range(256)) * 100)
    reads = [[str(tmp_path / "in.bin"), 10, 1000], [str(tmp_path / "in.bin"), 5000, 20000]]
    times = copy_baseline(reads, [123, 45678], tmp_path / "out")
    assert times.read > 0 and times.write > 0 and times.seconds == times.read + times.write
    assert sorted(p.stat().st_size for p in (tmp_path / "out").iterdir()) == [123, 45678]
    with pytest.raises(RuntimeError, match="short read"):
        copy_baseline([[str(tmp_path / "in.bin"), 25000, 1000]], [], tmp_path / "out2")


def mergekit_weight(setting: list[dict[str, object]], name: str, t: float) -> float:
    """mergekit's evaluate_setting for our settings: first matching filter; list = gradient."""
    for cond in setting:
        if "filter" not in cond or str(cond["filter"]) in name:
            value = cond["value"]
            if isinstance(value, list):
                return value[0] + t * (value[1] - value[0])  # type: ignore[no-any-return]
            return float(value)  # type: ignore[arg-type]
    raise AssertionError("no rule matched")


@pytest.mark.parametrize("layers", [2, 4, 8, 40])
def test_mergekit_config_is_the_founding_recipe(layers: int) -> None:
    span = span_for(layers)
    cfg = mergekit.config(
        Path("b"),
        Path("o"),
        Path("l"),
        layers=layers,
        span=span,
        ratios=(0.9, 0.0),
        lora_weight=0.25,
    )
    first = cfg["slices"][0]["sources"]
    assert [s["model"] for s in first] == ["b", "o", "o+l"]
    ratios = np.linspace(0.9, 0.0, span)
    for i in range(span):
        t = i / (span - 1) if span > 1 else 1.0  # mergekit's t within a slice
        name = f"model.layers.{i}.mlp.up_proj.weight"
        base, other, lora = (mergekit_weight(s["parameters"]["weight"], name, t) for s in first)
        # (1 - r) base + r (other + 0.25 Δ) == (1 - r) base + 0.75 r other + 0.25 r (other + Δ)
        assert (base, other, lora) == pytest.approx(
            (1 - ratios[i], 0.75 * ratios[i], 0.25 * ratios[i])
        )
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert [mergekit_weight(s["parameters"]["weight"], name, 0.0) for s in first] == [
            1.0,
            0.0,
            0.0,
        ]
    if span < layers:
        assert cfg["slices"][1]["sources"] == [
            {"model": "b", "layer_range": [span, layers], "parameters": {"weight": 1.0}}
        ]
    assert span_for(40) == 25


@pytest.mark.rotating  # ~11 s; the runner's own smoke run above runs on every run
def test_batch_benchmark_compares_ways_on_the_same_bytes(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "benchmarks.batch", "--tiny", "--layers", "2", "--recipes", "2",
        "--ways", "local -j 1,local -j 2", "--warm", "--cache", str(tmp_path / "cache"),
        "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["identical_bytes"] is True
    assert [r["way"] for r in record["runs"]] == ["local -j 1", "local -j 2"]
    assert all(r["seconds"] > 0 and r["worker_peak_rss"] > 0 for r in record["runs"])
    assert not (tmp_path / "cache" / "batch").exists()  # cleaned up


def test_device_check_counts_identical_tensors_and_ulps(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from benchmarks.device import compare

    a = {"x": torch.tensor([1.0, 2.0], dtype=torch.float16), "y": torch.ones(3)}
    b = {
        "x": a["x"]
        .view(torch.int16)
        .add(torch.tensor([0, 1], dtype=torch.int16))
        .view(torch.float16),
        "y": torch.ones(3),
    }
    for name, tensors in (("cpu", a), ("cuda", b)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    assert compare(tmp_path / "cpu", tmp_path / "cuda") == {
        "identical_tensors": 1, "differing_tensors": ["x"], "max_ulps": 1,
    }  # fmt: skip


def test_device_check_profiles_a_merge(tmp_path: Path) -> None:
    """The GPU check's profiled run, here on the CPU: it names the engine's functions."""
    from benchmarks.device import profile
    from lazymerge.testing import LlamaShape

    from conftest import synthetic_job

    shape = LlamaShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=100)
    recipe = synthetic_job(tmp_path, shape, {"values": [0.9, 0.0], "layers": [0, 2]})
    rows = profile(recipe, tmp_path / "out", "cpu")
    assert len(rows) == 15 and all(r["own_seconds"] >= 0 and r["calls"] > 0 for r in rows)
    assert list((tmp_path / "out").glob("*.safetensors"))  # and the merge was written


def test_timeline_samples_a_merge_by_phase(tmp_path: Path) -> None:
    from benchmarks.timeline import main as timeline
    from lazymerge.testing import LlamaShape

    from conftest import synthetic_job

    shape = LlamaShape(layers=4, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)
    recipe = synthetic_job(tmp_path, shape, {"values": [0.9, 0.0], "layers": [0, 2]})
    record_path = tmp_path / "timeline.json"
    args = [str(recipe), "-o", str(tmp_path / "out"), "--interval", "0.005", "--json"]
    assert timeline([*args, str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    assert record["merge_seconds"] > 0 and record["samples"]
    assert set(record["phases"]) <= {"import", "compute", "copy-base", "copy-other", "finish"}
    for row in record["samples"]:
        assert row["read_mb_s"] >= 0 and row["write_mb_s"] >= 0 and row["cores"] >= 0
        assert 0 <= row["steal_pct"] <= 100
    assert list((tmp_path / "out").glob("*.safetensors"))


def test_method_cases_are_the_published_slices_configs() -> None:
    from benchmarks.method_cases import CASES, case_config

    models, base, ft = Path("m"), "m/base", "m/finetune-1"
    slerp, stack = case_config(models, "slerp", 2), case_config(models, "passthrough", 2)
    assert slerp["slices"] == [{"sources": [
        {"model": base, "layer_range": [0, 2]}, {"model": ft, "layer_range": [0, 2]},
    ]}]  # fmt: skip
    assert [slerp[k] for k in ("merge_method", "base_model", "dtype")] == ["slerp", base, "float16"]
    assert [r.get("filter") for r in slerp["parameters"]["t"]] == ["self_attn", "mlp", None]
    assert stack["slices"] == [
        {"sources": [{"model": m, "layer_range": [0, 2]}]} for m in (base, ft)
    ]
    assert [stack.get(k) for k in ("merge_method", "base_model", "dtype")] == [
        "passthrough", None, "float16",
    ]  # fmt: skip
    assert CASES == ("ties", "dare_ties", "slerp", "passthrough")


def test_method_comparison_needs_no_base_for_a_frankenmerge(tmp_path: Path) -> None:
    """A passthrough's later layers exist in no input under their name: ulps against
    mergekit's output only; slerp keeps the base's names, so the unchanged shares too."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from benchmarks.method_cases import case_config, compare_outputs

    one = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    off = one.view(torch.int16).add(torch.tensor([0, 0, 3], dtype=torch.int16)).view(one.dtype)
    x0, x1 = "model.layers.0.x", "model.layers.1.x"
    models = {
        "base": {x0: one},
        "finetune-1": {x0: one + 1},
        "lm-passthrough": {x0: one, x1: one, "only.lm": one},
        "mk-passthrough": {x0: one, x1: off},
        "lm-slerp": {x0: one},
        "mk-slerp": {x0: off},
    }
    for name, tensors in models.items():
        (tmp_path / name).mkdir()
        save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / name / "model.safetensors")
    diffs = {}
    for case in ("passthrough", "slerp"):
        config = tmp_path / f"{case}.yml"
        config.write_text(yaml.safe_dump(case_config(tmp_path, case, 1)))
        diffs[case] = compare_outputs(
            str(tmp_path / f"lm-{case}"), str(tmp_path / f"mk-{case}"), str(config)
        )
        assert diffs[case]["over_1_ulp"] == 1
        # 3 binary ulps of 3.0 (2**-9 each) in eps * |x| units (2**-10 * 3.006)
        assert diffs[case]["max_ulp"] == pytest.approx(2.0, rel=0.01)
        assert diffs[case]["max_abs_diff"] == pytest.approx(3 * 2**-9)
    assert (diffs["passthrough"]["tensors"], diffs["passthrough"]["elements"]) == (2, 6)
    assert diffs["passthrough"]["only_lazymerge"] == ["only.lm"]
    assert "unchanged_lazymerge" not in diffs["passthrough"]
    assert diffs["slerp"]["unchanged_lazymerge"] == 1.0
    assert diffs["slerp"]["unchanged_mergekit"] == pytest.approx(2 / 3)


@pytest.mark.rotating  # ~9 s; the runner's own smoke run above runs on every run
def test_methods_benchmark_smoke_run(tmp_path: Path) -> None:
    """The chosen cases on a few-MB base and fine-tunes, without mergekit; a case the run
    leaves out keeps its earlier record, with the run it came from."""
    path = tmp_path / "m.json"
    earlier = {"date": "then", "layers": 2, "tiny": True, "cases": [{"case": "dare_ties"}]}
    path.write_text(json.dumps(earlier))
    cmd = [
        sys.executable, "-m", "benchmarks.methods", "--tiny", "--layers", "2", "--rounds", "1",
        "--no-mergekit", "--warm", "--cases", "passthrough,ties,slerp",
        "--work", str(tmp_path / "work"), "--json", str(path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    record = json.loads(path.read_text())
    assert [c["case"] for c in record["cases"]] == ["ties", "dare_ties", "slerp", "passthrough"]
    ties, dare, slerp, stack = record["cases"]
    assert dare["run"]["date"] == "then" and "run" not in ties
    for c in (ties, slerp, stack):
        assert c["bytes_read"] > 0 and c["bytes_written"] > 0 and "mergekit" not in c
        assert c["lazymerge_over_copy"] == pytest.approx(c["lazymerge_seconds"] / c["copy_seconds"])
        assert len(c["overlapped_runs"]) == 1 and c["overlapped_seconds"] > 0
        ratio = c["lazymerge_seconds"] / c["overlapped_seconds"]
        assert c["lazymerge_over_overlapped"] == pytest.approx(ratio)
        assert c["lazymerge_cpu_runs"][0] > 0 and 0 <= c["lazymerge_steal_runs"][0] <= 100
    assert stack["bytes_written"] > slerp["bytes_written"]  # twice the layers
    assert len(stack["config"]["slices"]) == 2 and record["mergekit"] == "not run: --no-mergekit"
    assert "passthrough: within 1.1x of the copy" in done.stdout
    assert "slerp: merges " in done.stdout and "CPU-s, steal" in done.stdout


def test_steal_is_the_hosts_share_of_every_core() -> None:
    from benchmarks.host import steal_share, stolen

    cores = os.cpu_count() or 1
    assert steal_share(10.0, 13.0, 1.5) == pytest.approx(3.0 / (cores * 1.5))
    assert steal_share(10.0, 10.0, 2.0) == 0.0
    assert steal_share(None, 3.0, 1.0) is None and steal_share(1.0, 2.0, 0.0) is None
    first = stolen()  # this machine's /proc/stat: seconds since boot, never falling
    assert first is not None and 0 <= first <= (stolen() or 0.0)
