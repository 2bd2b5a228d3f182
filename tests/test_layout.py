"""The package's shape: rooms that follow the data, imports flowing one way
(docs/ARCHITECTURE.md), and fixtures kept out of the merge's code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "lazymerge"
# A room may import from its own modules and from rooms of a lower rank only.
RANK = {
    "errors": 0,
    "read": 1,
    "recipe": 2,  # a mergekit config's Hub ids are found by read/hub.py
    "meaning": 3,
    "plan": 4,
    "write": 5,
    "run": 6,
    "testing": 6,  # fixtures: checkpoints written with the plan's shard split
    "testing_tokenizer": 6,  # fixtures: small tokenizers, trained here
    "views": 7,
    "cli": 8,
    "__main__": 9,  # the entry point: the command line, with start-up settings
    "demo": 8,
}


def room(module: str) -> str:
    """`lazymerge.run.tensor` -> `run`; `lazymerge` itself (the version) -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> list[str]:
    """Every lazymerge module `path` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [n for n in names if n.startswith("lazymerge")][:1]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("lazymerge")]
    return found


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def test_every_module_is_in_a_known_room() -> None:
    rooms = {room(m) for m in modules()} - {""}
    assert rooms == set(RANK)


def test_imports_flow_one_way() -> None:
    wrong = []
    for name, path in modules().items():
        mine = room(name)
        for target in imports(path):
            theirs = room(target)
            if theirs in ("", mine):
                continue
            if mine == "" or RANK[theirs] >= RANK[mine]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_only_the_output_lifecycle_writes_the_output_files() -> None:
    """lazymerge.json, config.json, the card and the index are written in write/output.py."""
    writers = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if any(w in text for w in ("write_json(", "write_text(")) and name not in (
            "lazymerge.write.output",
            "lazymerge.testing",  # writes input fixtures, not outputs
            "lazymerge.testing_tokenizer",  # likewise: a tokenizer beside a test model
            "lazymerge.demo",  # writes the demo's recipes
        ):
            writers.append(name)
    assert writers == []


def test_library_modules_stay_small() -> None:
    """STYLE.md: modules under ~400 lines."""
    assert {
        n: len(p.read_text().splitlines())
        for n, p in modules().items()
        if len(p.read_text().splitlines()) > 400
    } == {}


def test_commands_that_read_no_values_load_no_torch(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--version, --help, plan (an untrained-LoRA check included), inspect and verify start
    in a fraction of torch's import time; their figures are in benchmarks/startup.py."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(models["base"]),
                "other": {"model": str(models["other"]), "loras": [str(models["lora"])]},
                "gradient": {"values": [0.9, 0.0]},
            }
        )
    )
    out = tmp_path / "out"
    assert run_cli("merge", recipe, "-o", out, "-q") == 0
    for args in (
        ["--version"], ["--help"], ["plan", str(recipe)], ["inspect", str(models["lora"])],
        ["inspect", str(models["base"])], ["verify", str(out)],
    ):  # fmt: skip
        code = (
            "import sys; from lazymerge.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, file=sys.stderr)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
        )
        assert done.stderr.splitlines()[-1] == "0 False", (args, done.stderr)
