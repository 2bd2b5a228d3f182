"""python -m benchmarks.compare A B: how far two merged models differ, tensor by tensor.

Streams one tensor at a time (safe_open), so comparing two 13B outputs needs a few
tensors' memory. Prints JSON: max absolute difference, elements that differ, names
present in only one of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def _locations(model: Path) -> dict[str, Path]:
    index = model / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model / shard for name, shard in weight_map.items()}
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def compare(a: Path, b: Path) -> dict[str, object]:
    left, right = _locations(a), _locations(b)
    shared = sorted(set(left) & set(right))
    worst, worst_name, differing, total = 0.0, "", 0, 0
    for name in shared:
        with safe_open(str(left[name]), "pt") as fa, safe_open(str(right[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        if ta.shape != tb.shape:
            return {"error": f"{name}: shapes {list(ta.shape)} and {list(tb.shape)}"}
        diff = (ta.float() - tb.float()).abs()
        differing += int((diff > 0).sum())
        total += diff.numel()
        if diff.numel() and float(diff.max()) > worst:
            worst, worst_name = float(diff.max()), name
    return {
        "tensors": len(shared),
        "max_abs_diff": worst,
        "max_abs_diff_tensor": worst_name,
        "differing_elements": differing,
        "elements": total,
        "only_in_first": sorted(set(left) - set(right)),
        "only_in_second": sorted(set(right) - set(left)),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    json.dump(compare(Path(sys.argv[1]), Path(sys.argv[2])), sys.stdout)
