"""Never a broken model: resume, interrupts, verify, the NaN/Inf guard, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from lazymerge.cli import INTERRUPTED
from lazymerge.testing import LlamaShape

from conftest import interrupt_after, run_cli, synthetic_job

SHAPE = LlamaShape(layers=6, hidden=512, intermediate=1536, heads=8, kv_heads=8, vocab=300)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe over ~40 MB models whose output spans several shards."""
    root = tmp_path_factory.mktemp("resume")
    synthetic_job(
        root, SHAPE, {"values": [0.9, 0.0], "layers": [0, 4]},
        output={"dtype": "float16", "shard_size": "4MB"},
    )  # fmt: skip
    assert run_cli("merge", root / "recipe.yaml", "-o", root / "reference", "-q") == 0
    return root


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def interrupted(job: Path, out: Path, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """A merge of the job stopped by Ctrl-C at its `after`-th tensor."""
    interrupt_after(monkeypatch, after)
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q") == 130
    monkeypatch.undo()


def assert_same_as_reference(job: Path, out: Path) -> None:
    assert shards(out) == shards(job / "reference")
    for name in ("model.safetensors.index.json", "config.json"):
        assert (out / name).read_bytes() == (job / "reference" / name).read_bytes()
    assert not list(out.glob("*.partial"))


def test_resume_after_ctrl_c_keeps_finished_shards_and_matches(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    interrupted(job, out, monkeypatch, after=40)
    assert "run the same command with --resume" in capsys.readouterr().err
    assert not (out / "model.safetensors.index.json").exists() and list(out.glob("*.partial"))
    done = json.loads((out / "lazymerge.json").read_text())
    assert done["status"] == "incomplete" and done["shards"]
    finished = {name: (out / name).stat().st_mtime_ns for name in done["shards"]}
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q") == 1  # not without --resume
    assert "pass --resume" in capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "--resume", "--json") == 0
    assert {
        name: (out / name).stat().st_mtime_ns for name in finished
    } == finished  # kept, not rewritten
    # Kept shards are reported apart from the ones this run wrote.
    result = json.loads(capsys.readouterr().out)
    sizes = {s["name"]: s["size"] for s in result["shards"]}
    assert result["kept"] == sorted(finished) and not result["already_complete"]
    assert result["bytes_kept"] == sum(sizes[n] for n in finished)
    assert result["bytes_written"] == sum(n for name, n in sizes.items() if name not in finished)
    assert_same_as_reference(job, out)
    assert json.loads((out / "lazymerge.json").read_text())["status"] == "complete"


def test_resume_redoes_a_damaged_shard(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    interrupted(job, out, monkeypatch, after=50)
    first = sorted(json.loads((out / "lazymerge.json").read_text())["shards"])[0]
    data = bytearray((out / first).read_bytes())
    data[-1] ^= 0xFF  # a bit flipped on disk
    (out / first).write_bytes(bytes(data))
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q", "--resume") == 0
    assert_same_as_reference(job, out)


def test_the_summary_tells_kept_shards_from_written_ones(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    interrupted(job, out, monkeypatch, after=40)
    kept = sorted(json.loads((out / "lazymerge.json").read_text())["shards"])
    total = len(shards(job / "reference"))
    capsys.readouterr()
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "--resume") == 0
    lines = capsys.readouterr().out.splitlines()
    head = f"wrote {total - len(kept)} shard(s), kept {len(kept)} from the interrupted attempt,"
    assert f"{head} to {out}:" in lines
    assert [line.split()[0] for line in lines if line.endswith("(kept)")] == kept
    assert_same_as_reference(job, out)


def merge_command(job: Path, out: Path) -> list[str]:
    """`lazymerge merge` of the job's recipe, as a child process runs it."""
    return [
        sys.executable,
        "-m",
        "lazymerge",
        "merge",
        str(job / "recipe.yaml"),
        "-o",
        str(out),
        "-q",
    ]


def run_merge_child(job: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        merge_command(job, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_first_shard(out: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not any(out.glob("model-00001-*.safetensors")):
        assert proc.poll() is None, "the merge ended before its first shard could be seen"
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_resume_after_a_killed_process(job: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "out"
    proc = run_merge_child(job, out)
    wait_for_first_shard(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal arrived")
    if sig != signal.SIGKILL:  # SIGTERM 143, Ctrl-C 130: 128 + the signal, as shells say
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        assert err.strip() == INTERRUPTED  # one line (after click's empty one)
    assert not (out / "model.safetensors.index.json").exists()
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q", "--resume") == 0
    assert_same_as_reference(job, out)


def test_resume_refuses_changed_recipe_or_inputs(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    interrupted(job, out, monkeypatch, after=40)
    changed = yaml.safe_load((job / "recipe.yaml").read_text())
    changed["gradient"]["values"] = [0.8, 0.0]
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    for f in ("base", "other", "lora"):
        os.symlink(job / f, tmp_path / f)
    capsys.readouterr()
    assert run_cli("merge", tmp_path / "changed.yaml", "-o", out, "-q", "--resume") == 1
    assert (
        "the recipe changed since the first attempt; cannot resume: start over with --overwrite"
        in capsys.readouterr().err
    )
    assert (
        run_cli("merge", job / "recipe.yaml", "-o", out, "-q", "--resume", "--shard-size", "5MB")
        == 1
    )
    assert "the recipe changed" in capsys.readouterr().err
    lora = job / "lora" / "adapter_model.safetensors"
    stat = lora.stat()
    os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "replaced" upstream
    try:
        assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q", "--resume") == 1
        assert f"input {lora} changed since the first attempt" in capsys.readouterr().err
    finally:
        os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q", "--resume", "--overwrite") == 1
    assert "choose one" in capsys.readouterr().err


def test_verify(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = job / "reference"
    capsys.readouterr()
    assert run_cli("verify", good, "--deep") == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "sound" in line and "all values finite" in line
    out = tmp_path / "bad"
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q") == 0
    victim = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert run_cli("verify", out) == 1
    err = capsys.readouterr().err
    assert f"{victim}: sha256 differs from the manifest" in err and err.count("\n") == 1
    victim.unlink()
    assert run_cli("verify", out) == 1
    assert f"{victim}: missing" in capsys.readouterr().err
    # An index that lies about where a tensor lives.
    assert run_cli("merge", job / "recipe.yaml", "-o", out, "-q", "--overwrite") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "lm_head.weight"
    index["weight_map"][name] = next(
        s for s in set(index["weight_map"].values()) if s != index["weight_map"][name]
    )
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run_cli("verify", out) == 1
    assert f"{name} is mapped to" in capsys.readouterr().err
    # An interrupted merge is reported as such.
    interrupted(job, tmp_path / "cut", monkeypatch, after=40)
    capsys.readouterr()
    assert run_cli("verify", tmp_path / "cut") == 1
    assert "the merge is incomplete" in capsys.readouterr().err


def test_nonfinite_is_refused_unless_allowed(
    job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # fp32 inputs whose blend overflows fp16: the cast would make it Inf.
    base = tmp_path / "base"
    base.mkdir()
    tensors = load_file(str(job / "base" / "model-00001-of-00001.safetensors"))
    tensors = {k: v.float() for k, v in tensors.items()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = 1e6
    save_file(tensors, str(base / "model.safetensors"))
    args = ["gradient", base, job / "other", "--values", "0.5", "--dtype", "float16"]
    capsys.readouterr()
    assert run_cli(*args, "-o", tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err
    assert (
        "model.layers.1.mlp.up_proj.weight: 1 NaN/Inf values in rows" in err
        and "--allow-nonfinite" in err
    )
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert run_cli(*args, "-o", tmp_path / "out2", "-q", "--allow-nonfinite") == 0
    assert "model.layers.1.mlp.up_proj.weight holds NaN/Inf values" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out2" / "lazymerge.json").read_text())
    assert manifest["nonfinite"] == ["model.layers.1.mlp.up_proj.weight"]
    assert run_cli("verify", tmp_path / "out2") == 0
    assert run_cli("verify", tmp_path / "out2", "--deep") == 1
    assert (
        "tensor model.layers.1.mlp.up_proj.weight holds NaN/Inf values" in capsys.readouterr().err
    )


def test_bytes_do_not_depend_on_thread_count(job: Path, tmp_path: Path) -> None:
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run(merge_command(job, tmp_path / threads), env=env, check=True)
        assert shards(tmp_path / threads) == shards(job / "reference"), threads
