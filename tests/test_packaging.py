"""The wheel stands alone: it ships the example recipes, and the demo runs from it
outside the repository with nothing of the clone on the path."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lazymerge import __version__
from lazymerge.recipe.tokenizer import TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
DEMO_OUTPUTS = ("airolima-chronos-grad", "chronolima-airo-grad")

# The wheel is built from a clean copy of the tree: setuptools reuses build/lib in the
# source directory, where a module deleted since an earlier build would slip into the
# wheel, and a build in the shared tree would race with another run's.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*cache",
    ".hypothesis", ".demo", "demo-out",
)  # fmt: skip

# What pip prints when it cannot reach an index at all (urllib3's connection errors).
CONNECTION_ERRORS = re.compile(
    r"NewConnectionError|ConnectTimeoutError|ProxyError|ReadTimeoutError|"
    r"Temporary failure in name resolution|Name or service not known|Network is unreachable"
)


def network_down(pip_output: str) -> bool:
    """pip failed because it could not download the build backend, not because of us."""
    fetch_failed = "No matching distribution found for setuptools" in pip_output
    return fetch_failed and CONNECTION_ERRORS.search(pip_output) is not None


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(tmp / "wheels")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0 and network_down(output):
        pytest.skip("pip cannot reach the package index to fetch setuptools for the build")
    assert done.returncode == 0, output
    (wheel,) = (tmp / "wheels").glob("lazymerge-*.whl")
    return wheel


def test_wheel_holds_the_package_and_its_recipes_only(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.name for p in (ROOT / "lazymerge" / "examples").glob("*.yaml"))
    assert {"airolima-chronos.yaml", "chronolima-airo.yaml"} <= set(recipes)  # the demo's
    shipped = sorted(
        n.removeprefix("lazymerge/examples/") for n in names if n.startswith("lazymerge/examples/")
    )
    assert shipped == recipes
    assert "lazymerge/py.typed" in names
    # The built-in chat templates recipe/tokenizer.py names, each shipped.
    assert {f"lazymerge/templates/{t}.jinja" for t in TEMPLATES} <= set(names)
    assert "lazymerge/testing.py" in names  # the demo builds its models with it
    # No tests/, benchmarks/ or examples/ beside the package.
    assert {n.split("/")[0] for n in names} == {"lazymerge", f"lazymerge-{__version__}.dist-info"}

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    shutil.rmtree(tmp_path / "src")  # nothing of the source may be what runs
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = [sys.executable, "-c", "import lazymerge; print(lazymerge.__file__)"]
    found = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(site / "lazymerge" / "__init__.py")

    demo = [sys.executable, "-m", "lazymerge.demo", str(tmp_path / "demo")]
    done = subprocess.run(demo, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(from examples/airolima-chronos.yaml, span scaled to [0, 5])" in done.stdout
    for out in DEMO_OUTPUTS:
        assert (tmp_path / "demo" / out / "model.safetensors.index.json").is_file()


OFFLINE = """\
WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after \
connection broken by 'NewConnectionError('<HTTPConnection object at 0x7efdb0740450>: Failed to \
establish a new connection: [Errno 111] Connection refused')': /simple/setuptools/
ERROR: Could not find a version that satisfies the requirement setuptools>=68 (from versions: none)
ERROR: No matching distribution found for setuptools>=68
"""


@pytest.mark.parametrize(
    ("output", "down"),
    [
        (OFFLINE, True),
        # A flaky index that pip got past, then a real build failure: not a reason to skip.
        (OFFLINE.split("\n")[0] + "\nerror: package directory 'lazymerge' does not exist\n", False),
        # The index answered, but has no setuptools that fits: a real failure too.
        (OFFLINE.split("\n", 1)[1], False),
    ],
)
def test_skips_only_when_the_index_is_unreachable(output: str, down: bool) -> None:
    assert network_down(output) is down
