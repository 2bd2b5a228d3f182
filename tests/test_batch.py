"""`lazymerge batch`: many recipes, one task per shard, on local processes and on a real
local Ray cluster; bytes equal to serial merges, workers killed mid-shard."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lazymerge import __version__
from lazymerge.errors import InputError, MachineError
from lazymerge.run import batch as batch_module
from lazymerge.run.batch import FAILED, BatchSettings, Merge, run_batch
from lazymerge.run.workers import LocalExecutor, RayExecutor, ShardTask, make_shard
from lazymerge.testing import LlamaShape
from lazymerge.views.batch import batch_table
from lazymerge.views.card import drawn_here

from conftest import run_cli, synthetic_job

SMALL = LlamaShape(layers=4, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)
# One shard of ~100 MB with a LoRA: a second or so of work, long enough to be killed in.
SLOW = LlamaShape(layers=4, hidden=1024, intermediate=3072, heads=8, kv_heads=8, vocab=1000)
VALUES = ([0.9, 0.0], [0.5, 0.5], [0.0, 1.0])


def family(root: Path, shape: LlamaShape, shard_size: str) -> list[Path]:
    """Three recipes over the same inputs, gradients apart; their serial merges in
    root/serial/<name>."""
    synthetic_job(root, shape, {"values": [0.9, 0.0]}, output={"shard_size": shard_size})
    base = yaml.safe_load((root / "recipe.yaml").read_text())
    recipes = []
    for n, values in enumerate(VALUES):
        base["gradient"]["values"] = values
        recipes.append(root / f"sweep-{n}.yaml")
        recipes[-1].write_text(yaml.safe_dump(base))
        assert run_cli("merge", recipes[-1], "-o", root / "serial" / recipes[-1].stem, "-q") == 0
    return recipes


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return family(tmp_path_factory.mktemp("small"), SMALL, "2MB")


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return family(tmp_path_factory.mktemp("slow"), SLOW, "2GB")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray instance with 2 CPUs, shared by this module's Ray tests."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def beside(recipes: list[Path], tmp_path: Path) -> Path:
    """An out root next to the serial merges' (the recipes' folder/serial), named for the
    test: each model card writes its recipe's paths relative to its output directory, so
    outputs at the same depth have the same cards."""
    return recipes[0].parent / tmp_path.name


def assert_serial(recipes: list[Path], out_root: Path) -> None:
    """Every file of every merge equals the serial `lazymerge merge` output."""
    for r in recipes:
        assert files(out_root / r.stem) == files(r.parent / "serial" / r.stem), r.stem


def batch(*args: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    rc = run_cli("batch", *map(str, args), "-q", "--json")
    return rc, json.loads(capsys.readouterr().out)


def test_local_batch_writes_serial_bytes_and_a_rerun_skips(
    small: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = beside(small, tmp_path)
    rc, report = batch(*small, "--out-root", tmp_path, "-j", "2", capsys=capsys)
    assert rc == 0 and report["ok"]
    assert [m["status"] for m in report["merges"]] == ["merged"] * 3
    assert all(m["shards"] > 3 for m in report["merges"])  # several tasks per merge
    assert_serial(small, tmp_path)
    index = tmp_path / small[1].stem / "model.safetensors.index.json"
    assert report["merges"][1]["index_sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()

    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    rc, again = batch(*small, "--out-root", tmp_path, capsys=capsys)
    assert rc == 0 and [m["status"] for m in again["merges"]] == ["skipped"] * 3
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == stamp

    lost = sorted((tmp_path / small[2].stem).glob("model-*.safetensors"))[1]
    lost_bytes = lost.read_bytes()
    lost.unlink()
    rc, third = batch(*small, "--out-root", tmp_path, capsys=capsys)
    redo = third["merges"][2]
    assert rc == 0 and redo["status"] == "merged"
    assert redo["kept"] == redo["shards"] - 1  # only the lost shard was written again
    assert redo["bytes_written"] == len(lost_bytes)
    assert_serial(small, tmp_path)


def test_one_failed_recipe_does_not_stop_the_others(
    small: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = small[0].parent / "broken.yaml"
    recipe = yaml.safe_load(small[0].read_text())
    recipe["other"]["model"] = str(small[0].parent / "no-such-model")
    broken.write_text(yaml.safe_dump(recipe))
    tmp_path = beside(small, tmp_path)
    rc = run_cli("batch", small[0], broken, small[1], "--out-root", tmp_path, "-q")
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.yaml" in err and "no-such-model" in err and "Traceback" not in err
    assert not (tmp_path / "broken" / "model.safetensors.index.json").exists()
    assert_serial(small[:2], tmp_path)


def test_recipes_that_would_share_an_output_are_refused(
    small: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    twin = tmp_path / "elsewhere" / small[0].name
    twin.parent.mkdir()
    twin.write_text(small[0].read_text())
    assert run_cli("batch", small[0], twin, "--out-root", tmp_path / "out", "-q") == 1
    assert "would both write to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_worker_refuses_inputs_it_cannot_see_or_that_differ(
    small: list[Path], tmp_path: Path
) -> None:
    task, merge = planned_task(small[0], tmp_path)
    assert merge.status == "running"  # planned, output prepared, nothing run
    with pytest.raises(InputError, match="shared storage"):
        make_shard(unmounted(task, tmp_path))
    changed = dict(task.expect["inputs"])
    first = next(iter(changed))
    changed[first] = {**changed[first], "size": changed[first]["size"] + 1}
    with pytest.raises(InputError, match="not the file the driver planned with"):
        make_shard(replace(task, expect={**task.expect, "inputs": changed}))


def test_a_worker_of_another_version_is_a_machine_error(small: list[Path], tmp_path: Path) -> None:
    task, _ = planned_task(small[0], tmp_path)
    with pytest.raises(MachineError) as caught:
        make_shard(replace(task, expect={**task.expect, "lazymerge_version": "0.0.1"}))
    assert str(caught.value) == (
        f"on worker {socket.gethostname()}: lazymerge {__version__}, the driver runs 0.0.1; "
        "install the same version on every worker"
    )


def lie_about_the_first_input(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the driver tell workers a wrong size for one input (the driver only: workers
    are spawned); the path it lies about goes into the list returned."""
    real = batch_module._expect
    lied: list[str] = []

    def lie(record: Any) -> dict[str, Any]:
        expect = real(record)
        path = next(iter(expect["inputs"]))
        lied.append(path)
        inputs = {**expect["inputs"], path: {**expect["inputs"][path], "size": -1}}
        return {**expect, "inputs": inputs}

    monkeypatch.setattr(batch_module, "_expect", lie)
    return lied


def test_lazymerge_debug_adds_the_driver_and_worker_tracebacks(
    small: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One recipe fails while planning (in the driver), one in its workers: one line each,
    or with LAZYMERGE_DEBUG, the same line and then the traceback from where it was raised."""
    broken = small[0].parent / "unplannable.yaml"  # its paths are relative to its folder
    recipe = yaml.safe_load(small[0].read_text())
    recipe["other"]["model"] = str(tmp_path / "no-such-model")
    broken.write_text(yaml.safe_dump(recipe))
    lied = lie_about_the_first_input(monkeypatch)

    def run(out: str) -> list[str]:
        """The errors of a batch of the two; stderr says each after its recipe."""
        recipes = [broken, small[0]]
        rc = run_cli("batch", *recipes, "--out-root", tmp_path / out, "-j", "1", "-q", "--json")
        captured = capsys.readouterr()
        report = json.loads(captured.out)  # still well-formed with tracebacks in it
        assert rc == 1 and [m["status"] for m in report["merges"]] == ["failed"] * 2
        errors = [m["error"] for m in report["merges"]]
        assert captured.err == "".join(
            f"lazymerge: error: {r}: {e}\n" for r, e in zip(recipes, errors, strict=True)
        )
        return errors

    monkeypatch.delenv("LAZYMERGE_DEBUG", raising=False)
    planning, working = run("plain")
    assert planning == f"{broken}: other.model: {tmp_path / 'no-such-model'} does not exist"
    assert re.fullmatch(
        r"model-00001-of-\d{5}\.safetensors: "
        + re.escape(
            f"on worker {socket.gethostname()}: {lied[0]} is not the file the driver planned "
            "with (size, mtime or header differ); batch workers must see the driver's paths "
            "and files (shared storage)"
        ),
        working,
    ), working

    monkeypatch.setenv("LAZYMERGE_DEBUG", "1")
    planning_tb, working_tb = run("debug")
    assert planning_tb.startswith(planning + "\nTraceback (most recent call last):\n")
    assert ", in _open\n" in planning_tb and planning_tb.endswith(f"RecipeError: {planning}")
    assert working_tb.startswith(working + "\n")
    # The worker's own traceback, brought back by the process pool.
    remote = working_tb.split("_RemoteTraceback: ")[1]
    assert ", in make_shard\n" in remote and ", in _worker_plan\n" in remote


def test_a_multi_line_error_stays_under_its_row() -> None:
    merge = Merge(Path("sweep-0.yaml"), Path("out"), status=FAILED, error="why\nTraceback")
    assert batch_table([merge], 1.0).splitlines()[1:4] == [
        "sweep-0  failed      0.0       0 B  0       -",
        "         why",  # under the status column: the recipe column is 7 wide
        "         Traceback",
    ]


class Recorder:
    """An executor that runs nothing: it keeps the tasks it was given."""

    def __init__(self) -> None:
        self.tasks: list[ShardTask] = []

    def run(self, tasks: Any) -> Iterator[tuple[ShardTask, str]]:
        self.tasks = list(tasks)
        return iter(())


def planned_task(recipe: Path, out_root: Path) -> tuple[ShardTask, Merge]:
    """The first shard task of a one-recipe batch, and its merge, as the driver made them."""
    recorder = Recorder()
    (merge,) = run_batch([recipe], out_root, BatchSettings(progress=False), recorder, drawn_here)
    return recorder.tasks[0], merge


def unmounted(task: ShardTask, root: Path) -> ShardTask:
    """The task with its other model at a path no worker sees."""
    assert task.recipe.other is not None
    other = replace(task.recipe.other, path=root / "not-mounted")
    return replace(task, recipe=replace(task.recipe, other=other))


def holder(path: Path) -> int | None:
    """The process that has `path` open, from /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return int(pid)
        except OSError:
            continue
    return None


def kill_first_writer(out_root: Path, stop: threading.Event) -> list[int]:
    """SIGKILL the first process seen writing a .partial shard under out_root."""
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        for partial in out_root.glob("*/*.partial"):
            pid = holder(partial)
            if pid is not None and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return killed
        time.sleep(0.002)
    return killed


def batch_with_a_kill(recipes: list[Path], out_root: Path, executor: Any) -> list[Merge]:
    stop = threading.Event()
    killed: list[int] = []
    watcher = threading.Thread(target=lambda: killed.extend(kill_first_writer(out_root, stop)))
    watcher.start()
    try:
        merges = run_batch(recipes, out_root, BatchSettings(progress=False), executor, drawn_here)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was caught writing a shard"
    return merges


# The local executor's retry runs on every run; ray's (~10 s more, with its cluster's
# start) rotates (tests/conftest.py): the ray tests below run on every run.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", pytest.param("ray", marks=pytest.mark.rotating)])
def test_a_worker_killed_mid_shard_is_retried(
    slow: list[Path], tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
    executor = RayExecutor(None, 2, retries=2) if kind == "ray" else LocalExecutor(2, retries=2)
    tmp_path = beside(slow, tmp_path)
    merges = batch_with_a_kill(slow, tmp_path, executor)
    assert [m.status for m in merges] == ["merged"] * 3, [m.error for m in merges]
    assert sum(m.redone for m in merges) >= 1
    assert_serial(slow, tmp_path)


def test_ray_batch_of_three_writes_serial_bytes(
    ray_cluster: None, small: list[Path], tmp_path: Path
) -> None:
    tmp_path = beside(small, tmp_path)
    merges = run_batch(
        small, tmp_path, BatchSettings(progress=False), RayExecutor(None, 2, retries=1), drawn_here
    )
    assert [m.status for m in merges] == ["merged"] * 3, [m.error for m in merges]
    assert_serial(small, tmp_path)
    assert all(m.peak_rss > 0 for m in merges)  # measured in the workers


def test_ray_task_errors_are_one_line_and_not_retried(
    ray_cluster: None, small: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, _ = planned_task(small[0], tmp_path / "plan")
    monkeypatch.delenv("LAZYMERGE_DEBUG", raising=False)
    ((_, outcome),) = RayExecutor(None, 2, retries=3).run([unmounted(task, tmp_path)])
    assert isinstance(outcome, str)
    assert "shared storage" in outcome and "\n" not in outcome
    monkeypatch.setenv("LAZYMERGE_DEBUG", "1")  # then the worker's traceback follows
    ((_, traced),) = RayExecutor(None, 2, retries=3).run([unmounted(task, tmp_path)])
    assert isinstance(traced, str) and traced.startswith(outcome + "\n")
    assert "ray::make_shard()" in traced and ", in _worker_plan\n" in traced


def test_ray_not_installed_is_a_machine_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MachineError) as caught:
        RayExecutor(None, 1, retries=0)
    assert str(caught.value) == "--executor ray needs Ray: pip install 'lazymerge[ray]'"


def test_no_ray_cluster_at_the_address_is_a_machine_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")

    def refuse(**kwargs: object) -> None:
        raise ConnectionError("could not find any running Ray instance")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even with ray_cluster up
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(MachineError) as caught:
        list(RayExecutor("ray://head:10001", 1, retries=0).run([]))
    assert str(caught.value) == (
        "cannot reach Ray at ray://head:10001: could not find any running Ray instance"
    )


def test_ray_missing_or_misused_is_one_line(
    small: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    assert run_cli("batch", small[0], "--out-root", out, "--address", "auto", "-q") == 1
    assert "--address is for --executor ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if lazymerge[ray] were not installed
    assert run_cli("batch", small[0], "--out-root", out, "--executor", "ray", "-q") == 1
    err = capsys.readouterr().err
    assert "pip install 'lazymerge[ray]'" in err and err.count("\n") == 1
    assert not out.exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_batch_device_cuda_without_a_gpu_is_refused_before_writing(
    small: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = beside(small, tmp_path)
    assert run_cli("batch", small[0], "--out-root", out, "--device", "cuda", "-q") == 1
    assert "no CUDA GPU here" in capsys.readouterr().err
    assert not out.exists()
    rc, report = batch(small[0], "--out-root", out, "--device", "auto", capsys=capsys)
    assert rc == 0 and report["merges"][0]["status"] == "merged"
    assert_serial(small[:1], out)


def test_gguf_output_is_refused_by_batch(
    small: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GGUF is one file, written by merge: batch (one task per safetensors shard)
    refuses the flags and a recipe that asks for one, in one line, writing nothing."""
    out = tmp_path / "out"
    flags = ["--format", "gguf", "--quant", "q8_0"]
    assert run_cli("batch", small[0], "--out-root", out, "-q", *flags) == 1
    assert "run lazymerge merge --format gguf per recipe" in capsys.readouterr().err
    gguf = small[0].parent / "gguf-recipe.yaml"
    recipe = yaml.safe_load(small[0].read_text()) | {"output": {"format": "gguf", "quant": "q8_0"}}
    gguf.write_text(yaml.safe_dump(recipe))
    assert run_cli("batch", gguf, "--out-root", out, "-q") == 1
    err = capsys.readouterr().err
    assert "output format gguf is one file" in err and "Traceback" not in err
    assert not (out / "gguf-recipe" / "model-q8_0.gguf").exists()
