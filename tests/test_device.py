"""--device: cpu, cuda, auto. The GPU's arithmetic is checked against the CPU's where a
GPU exists (skipped elsewhere); its host-side path (staging, cast before the copy down)
is checked on the CPU too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lazymerge.errors import MachineError, RecipeError
from lazymerge.plan import PlannedTensor
from lazymerge.run import budget, device, process
from lazymerge.run.device import parse_device, resolve_device
from lazymerge.testing import LlamaShape

from conftest import run_cli, synthetic_job

SHAPE = LlamaShape(layers=4, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Blend, LoRA on the other side, copies: every path; and its CPU merge."""
    root = tmp_path_factory.mktemp("device")
    recipe = synthetic_job(
        root, SHAPE, {"values": [0.9, 0.0], "layers": [0, 3]}, output={"dtype": "float16"}
    )
    assert run_cli("merge", recipe, "-o", root / "cpu", "-q", "--device", "cpu") == 0
    return root


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def no_gpu(name: str) -> str:
    built = "with" if torch.backends.cuda.is_built() else "without"
    return (
        f"--device {name}: no CUDA GPU here (torch {torch.__version__}, built {built} CUDA); "
        "use --device cpu or auto"
    )


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_a_missing_gpu_is_the_machine_a_bad_name_the_recipe() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(MachineError) as missing:
            resolve_device(name)
        assert str(missing.value) == no_gpu(name)
    with pytest.raises(RecipeError) as bad:
        parse_device("tpu")
    assert str(bad.value) == "--device tpu: expected cpu, cuda, cuda:N or auto"


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_and_touches_nothing(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "--device", "cuda") == 1
    assert capsys.readouterr().err == f"lazymerge: error: {no_gpu('cuda')}\n"
    assert not out.exists()


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_auto_without_a_gpu_is_the_cpu(job: Path, tmp_path: Path) -> None:
    assert (
        run_cli("merge", job / "recipe.yaml", "-o", tmp_path / "auto", "-q", "--device", "auto")
        == 0
    )
    assert shards(tmp_path / "auto") == shards(job / "cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x"])
def test_unknown_devices_are_refused(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert run_cli("merge", job / "recipe.yaml", "-o", tmp_path / "o", "--device", name) == 1
    assert "expected cpu, cuda, cuda:N or auto" in capsys.readouterr().err


def test_the_staged_path_writes_the_cpu_bytes(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU's host side (rows through a staging buffer, the cast before the copy down),
    run on the CPU: same bytes."""
    real = device.Scratch
    made: list[device.Scratch] = []

    def staged(where: torch.device | None = None) -> device.Scratch:
        made.append(real(where, staged=True))
        return made[-1]

    monkeypatch.setattr(device, "Scratch", staged)
    assert run_cli("merge", job / "recipe.yaml", "-o", tmp_path / "staged", "-q") == 0
    assert made and all(s._gpu for s in made)
    assert shards(tmp_path / "staged") == shards(job / "cpu")


def test_cache_chunks_do_not_change_the_bytes(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU blends a block chunk by chunk (64 rows here where a LoRA applies, a row
    where none does; the whole tensor in `job`): element-wise arithmetic and fixed LoRA
    row chunks, so the same bytes. The merge's
    torch threads are its own: the caller's setting comes back."""
    chunks: list[int] = []
    real = budget.chunk_rows

    def spy(t: PlannedTensor, rows: int, threads: int) -> int:
        chunks.append(real(t, rows, threads))
        return chunks[-1]

    monkeypatch.setattr(budget, "CACHE_CHUNK", 1)
    monkeypatch.setattr(budget, "chunk_rows", spy)
    threads = torch.get_num_threads()
    assert run_cli("merge", job / "recipe.yaml", "-o", tmp_path / "chunked", "-q") == 0
    assert torch.get_num_threads() == threads
    assert set(chunks) == {1, budget.LORA_ROWS}  # the smallest chunks each kind of tensor allows
    assert shards(tmp_path / "chunked") == shards(job / "cpu")


@pytest.mark.parametrize(
    ("cores", "torch_threads", "jobs", "expected"),
    [(2, 2, 1, 1), (16, 16, 1, 15), (16, 8, 1, 8), (16, 16, 4, 3), (2, 2, 2, 1), (1, 1, 1, 1)],
)
def test_compute_threads_leave_a_core_to_the_writer(
    monkeypatch: pytest.MonkeyPatch, cores: int, torch_threads: int, jobs: int, expected: int
) -> None:
    monkeypatch.setattr(budget.os, "sched_getaffinity", lambda _: set(range(cores)))  # usable_cores
    assert process.compute_threads(torch_threads, jobs) == expected


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in fp16 units in the last place (same-sign values)."""
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run on the lent GPU machine)")
def test_gpu_output_equals_cpu_except_lora_tensors_within_one_ulp(
    job: Path, tmp_path: Path
) -> None:
    assert (
        run_cli("merge", job / "recipe.yaml", "-o", tmp_path / "gpu", "-q", "--device", "cuda") == 0
    )
    cpu = {
        k: v for f in sorted((job / "cpu").glob("*.safetensors")) for k, v in load_file(f).items()
    }
    gpu = {
        k: v
        for f in sorted((tmp_path / "gpu").glob("*.safetensors"))
        for k, v in load_file(f).items()
    }
    assert cpu.keys() == gpu.keys()
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name in cpu:
        if any(t in name for t in lora_targets) and ".layers." in name:
            assert ulps(cpu[name], gpu[name]) <= 1, name  # GEMM accumulation order differs
        else:
            assert torch.equal(cpu[name], gpu[name]), name  # blends and casts: IEEE both


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run on the lent GPU machine)")
def test_gpu_memory_is_bounded_by_the_row_blocks(job: Path, tmp_path: Path) -> None:
    torch.cuda.reset_peak_memory_stats()
    assert (
        run_cli(
            "merge",
            job / "recipe.yaml",
            "-o",
            tmp_path / "gpu",
            "-q",
            "--device",
            "cuda",
            "--max-memory",
            "1MiB",
        )
        == 0
    )
    # 64-row blocks of the widest tensor (768 x 256 fp32 rows), two sides, LoRA factors
    assert torch.cuda.max_memory_allocated() < 8 * 2**20
