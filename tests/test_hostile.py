"""Hostile inputs: each is one clear line, a non-zero exit, nothing that looks complete,
and inputs left exactly as they were."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_cli, tiny_config

Build = Callable[[dict[str, Path], Path], tuple[list[Any], list[Path]]]


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int, str]]:
    files = [
        f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()
    ]
    return {
        str(f): (f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in files
    }


def first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def tensors_of(header: dict[str, Any]) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def broken_base(mutate: Callable[[Path], None]) -> Build:
    """`lazymerge gradient` with a damaged copy of the base."""

    def build(models: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path]]:
        base = tmp / "base"
        shutil.copytree(models["base"], base)
        mutate(base)
        return ["gradient", base, models["other"], "--values", "0.5"], [base, models["other"]]

    return build


def truncate(base: Path) -> None:
    f = sorted(base.glob("model-*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:-100])


def huge_header_len(base: Path) -> None:
    f = first_shard(base)
    f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])


def header_bytes(junk: bytes) -> Callable[[Path], None]:
    def mutate(base: Path) -> None:
        f = first_shard(base)
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        f.write_bytes(raw[:8] + (junk * n)[:n] + raw[8 + n :])

    return mutate


def edit_first_shard(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda base: rewrite_header(first_shard(base), edit)


def overlap(h: dict[str, Any]) -> None:
    a, b = tensors_of(h)[:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]


def past_end(h: dict[str, Any]) -> None:
    last = tensors_of(h)[-1]
    start, end = h[last]["data_offsets"]
    h[last]["data_offsets"] = [start + 4096, end + 4096]


def reversed_offsets(h: dict[str, Any]) -> None:
    name = tensors_of(h)[0]
    h[name]["data_offsets"] = h[name]["data_offsets"][::-1]


def wrong_shape(h: dict[str, Any]) -> None:
    h[tensors_of(h)[0]]["shape"][0] += 1


def unknown_dtype(h: dict[str, Any]) -> None:
    h[tensors_of(h)[0]]["dtype"] = "Q4_K"


def config_text(text: str) -> Callable[[Path], None]:
    def mutate(base: Path) -> None:
        (base / "config.json").write_text(text)

    return mutate


def index_edit(edit: Callable[[dict[str, str], str], None]) -> Callable[[Path], None]:
    def mutate(base: Path) -> None:
        path = base / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        edit(index["weight_map"], first_shard(base).name)
        path.write_text(json.dumps(index))

    return mutate


def ghost(weight_map: dict[str, str], shard: str) -> None:
    weight_map["model.layers.0.ghost.weight"] = shard


def escape(target: str) -> Callable[[dict[str, str], str], None]:
    def edit(weight_map: dict[str, str], shard: str) -> None:
        weight_map["model.norm.weight"] = target

    return edit


def broken_adapter(edit: Callable[[dict[str, Any]], None]) -> Build:
    """`lazymerge lora` with a damaged copy of the adapter."""

    def build(models: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path]]:
        lora = tmp / "lora"
        shutil.copytree(models["lora"], lora)
        tensors = load_file(str(lora / "adapter_model.safetensors"))
        edit(tensors)
        save_file(tensors, str(lora / "adapter_model.safetensors"))
        return ["lora", models["other"], lora], [lora, models["other"]]

    return build


def stray_target(t: dict[str, Any]) -> None:
    for ab in ("A", "B"):
        t[f"base_model.model.model.layers.99.mlp.up_proj.lora_{ab}.weight"] = t.pop(
            f"base_model.model.model.layers.0.mlp.up_proj.lora_{ab}.weight"
        )


def rank_mismatch(t: dict[str, Any]) -> None:
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    t[key] = t[key][:, :3].contiguous()


def other_model(**changes: int) -> Build:
    def build(models: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path]]:
        from transformers import LlamaForCausalLM

        config = tiny_config()
        for k, v in changes.items():
            setattr(config, k, v)
        LlamaForCausalLM(config).save_pretrained(tmp / "odd")
        return ["gradient", models["base"], tmp / "odd", "--values", "0.5"], [
            models["base"],
            tmp / "odd",
        ]

    return build


def recipe(edit: Callable[[dict[str, Any]], None]) -> Build:
    def build(models: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path]]:
        data: dict[str, Any] = {
            "base": str(models["base"]),
            "other": {
                "model": str(models["other"]),
                "loras": [{"path": str(models["lora"]), "weight": 0.25}],
            },
            "gradient": {"values": [0.9, 0.0], "layers": [0, 5]},
        }
        edit(data)
        (tmp / "r.yaml").write_text(yaml.safe_dump(data))
        return ["merge", tmp / "r.yaml"], [models["base"], models["other"], models["lora"]]

    return build


def setter(*path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def raw_first_header(
    edit: Callable[[list[tuple[str, str]]], list[tuple[str, str]]],
) -> Callable[[Path], None]:
    """Rewrite the first shard's header from (key, value as JSON text) pairs: a key may
    come twice, which a dict cannot say."""

    def mutate(base: Path) -> None:
        f = first_shard(base)
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        pairs = edit([(k, json.dumps(v)) for k, v in json.loads(raw[8 : 8 + n]).items()])
        body = ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}").encode()
        f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])

    return mutate


def drop_tensor(i: int) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        del h[tensors_of(h)[i]]

    return edit


def trailing_bytes(base: Path) -> None:
    f = first_shard(base)
    f.write_bytes(f.read_bytes() + bytes(16))


NORM = "model.norm.weight"  # in the fixture's fifth shard


def norm_listed_twice(base: Path) -> None:
    path = base / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    listing = [*index["weight_map"].items(), (NORM, first_shard(base).name)]
    pairs = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in listing)
    path.write_text(f'{{"metadata": {json.dumps(index["metadata"])}, "weight_map": {{{pairs}}}}}')


def norm_in_two_shards(base: Path) -> None:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    tensors = load_file(str(first_shard(base)))
    tensors[NORM] = load_file(str(base / index["weight_map"][NORM]))[NORM]
    save_file(tensors, str(first_shard(base)), metadata={"format": "pt"})


CASES: dict[str, tuple[Build, str]] = {
    "truncated shard": (broken_base(truncate), "the file is truncated"),
    "header length past the file": (
        broken_base(huge_header_len),
        "header length 1000000000000 is larger than the file",
    ),
    "header not JSON": (broken_base(header_bytes(b"x")), "header is not valid UTF-8 JSON"),
    "header not UTF-8": (broken_base(header_bytes(b"\xff\xfe")), "header is not valid UTF-8 JSON"),
    "overlapping offsets": (
        broken_base(edit_first_shard(overlap)),
        "overlaps the tensor before it",
    ),
    "offsets past the end": (broken_base(edit_first_shard(past_end)), "but the file has"),
    "offsets out of order": (
        broken_base(edit_first_shard(reversed_offsets)),
        "malformed data_offsets",
    ),
    "offsets not dtype x shape": (broken_base(edit_first_shard(wrong_shape)), "needs"),
    "unknown dtype": (broken_base(edit_first_shard(unknown_dtype)), "unknown dtype 'Q4_K'"),
    "index lists a tensor its shard lacks": (
        broken_base(index_edit(ghost)),
        "'model.layers.0.ghost.weight' is listed in",
    ),
    "index escapes with ../": (
        broken_base(index_edit(escape("../other/model-00001-of-00006.safetensors"))),
        "must be a file name inside",
    ),
    "index with an absolute path": (
        broken_base(index_edit(escape("/etc/passwd"))),
        "must be a file name inside",
    ),
    "config.json not JSON": (
        broken_base(config_text('{"model_type": "llama",')),
        "config.json: not valid JSON (Expecting property name",
    ),
    "config.json not an object": (
        broken_base(config_text("[1, 2]")),
        "config.json: not a JSON object; fix or remove it",
    ),
    "adapter targets a missing module": (
        broken_adapter(stray_target),
        "targets model.layers.99.mlp.up_proj.weight, which",
    ),
    "adapter rank mismatch": (
        broken_adapter(rank_mismatch),
        "rank mismatch for model.layers.0.mlp.up_proj",
    ),
    "base/other shape mismatch": (
        other_model(intermediate_size=96),
        "model.layers.0.mlp.gate_proj.weight: base",
    ),
    "base/other layer counts differ": (other_model(num_hidden_layers=5), "has 8 layers but other"),
    "recipe unknown key": (recipe(setter("gradient", "ratio", value=1)), "unknown key 'ratio'"),
    "recipe negative layer": (
        recipe(setter("gradient", "layers", value=[-2, 4])),
        "[-2, 4] is not a span",
    ),
    "recipe span past the last layer": (
        recipe(setter("gradient", "layers", value=[0, 9])),
        "span [0, 9) goes past the last layer",
    ),
    "recipe non-numeric value": (
        recipe(setter("gradient", "values", value=[0.9, "lots"])),
        "expected a number, got 'lots'",
    ),
    "ambiguous: a tensor twice in a header": (
        broken_base(raw_first_header(lambda pairs: [*pairs, pairs[-1]])),
        "appears 2 times in the header, so readers may disagree on which entry counts",
    ),
    "ambiguous: a key twice in a header entry": (
        broken_base(
            raw_first_header(lambda p: [*p[:-1], (p[-1][0], '{"shape": [1], ' + p[-1][1][1:])])
        ),
        "has key 'shape' 2 times in the header; re-save it with safetensors.torch.save_file",
    ),
    "ambiguous: a gap between tensors": (
        broken_base(edit_first_shard(drop_tensor(1))),
        "belong to no tensor (safetensors refuses gaps)",
    ),
    "ambiguous: data not starting at 0": (
        broken_base(edit_first_shard(drop_tensor(0))),
        "data offsets 0 to ",
    ),
    "ambiguous: bytes after the last tensor": (
        broken_base(trailing_bytes),
        "the last 16 bytes of the file belong to no tensor",
    ),
    "ambiguous: index lists a tensor twice": (
        broken_base(norm_listed_twice),
        f"tensor '{NORM}' is listed 2 times in weight_map (model-00005-of-00006.safetensors "
        "and model-00001-of-00006.safetensors)",
    ),
    "ambiguous: a tensor in two shards": (
        broken_base(norm_in_two_shards),
        f"tensor '{NORM}' is in two shards, model-00001-of-00006.safetensors and "
        "model-00005-of-00006.safetensors (the index lists it in model-00005",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused(
    case: str, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, message = CASES[case]
    args, inputs = build(models, tmp_path)
    out = tmp_path / "out"
    refused(capsys, [*args, "-o", out, "-q"], inputs, out, message)
    assert not out.exists()  # refused from headers and configs, before the output is touched


@pytest.mark.parametrize(
    ("text", "why"),
    [('{"model_type": "llama",', "not valid JSON"), ("[1, 2]", "not a JSON object")],
)
def test_inspect_refuses_a_malformed_config(
    text: str,
    why: str,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    config_text(text)(base)
    refused(capsys, ["inspect", base], [base], None, f"{base / 'config.json'}: {why}")


def refused(
    capsys: pytest.CaptureFixture[str],
    args: list[Any],
    inputs: list[Path],
    out: Path | None,
    message: str,
) -> None:
    before = snapshot(inputs)
    capsys.readouterr()
    rc = run_cli(*args)
    err = capsys.readouterr().err
    assert rc != 0
    assert (
        err.startswith("lazymerge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    ), err
    assert message in err, err
    if out is not None:  # (when the output is an input, the snapshot is the check)
        assert not (out / "model.safetensors.index.json").exists()
    assert snapshot(inputs) == before


def half_blend(models: dict[str, Path], *more: object) -> list[object]:
    """`lazymerge gradient` blending the two models half and half, then `more`."""
    return ["gradient", models["base"], models["other"], "--values", "0.5", *more]


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_output_in_an_input(
    where: str, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = models["other"] if where == "equal" else models["other"] / "merged"
    args = half_blend(models, "-o", out, "--overwrite")
    refused(
        capsys,
        args,
        [models["base"], models["other"]],
        None if where == "equal" else out,
        "overlaps input",
    )
    assert not (models["other"] / "merged").exists()


def test_full_disk(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_pwrite, real_pwritev, real_copy = os.pwrite, os.pwritev, os.copy_file_range
    written = {"bytes": 0}

    def room(n: int) -> None:  # the disk fills up mid-merge
        if written["bytes"] > 300_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written["bytes"] += n

    def pwrite(fd: int, data: Any, offset: int) -> int:
        room(len(data))
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:  # uncached writes
        room(sum(len(b) for b in buffers))
        return real_pwritev(fd, buffers, offset, flags)

    def copy_file_range(src: int, dst: int, count: int, *at: Any) -> int:
        room(count)
        return real_copy(src, dst, count, *at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    out = tmp_path / "out"
    args = half_blend(models, "--shard-size", "200KB", "-o", out, "-q")
    refused(
        capsys, args, [models["base"], models["other"]], out, "disk full; the output is incomplete"
    )
    assert list(out.glob("*.partial")) and list(out.glob("model-00001-*.safetensors"))
    monkeypatch.undo()  # space freed: the finished shards are kept
    assert run_cli(*args, "--resume") == 0
    assert run_cli("verify", out) == 0
