"""mergekit's own merge-method code on whole tensors: the reference for
tests/test_task_methods.py. Run by the python of mergekit's venv (tests/mergekit_ref.py),
never imported by lazymerge's tests:

    <venv>/bin/python tests/mergekit_kernels.py cases.safetensors results.safetensors

`cases.safetensors` holds the input tensors and, in its metadata, `cases`: a JSON list of
{id, method, inputs (tensor keys, the base first), order (input indices in the config's
order), dtype, shared, per_input (one dict per input, the base first), draws (tensor keys
of uniforms, one per input that draws, in the order mergekit draws; or null), and
optionally base (false: no base model, input 0 is simply the first model; default true)
and exact_sums (true: torch.linalg.vector_norm and torch.dot of whole tensors return
their correctly rounded values, as lazymerge's float64 sums do; default false)}.
Each case runs through `mergekit.merge_methods.get(method)`'s public call (inputs bound
by id, the compute dtype given), as mergekit's task adapter runs it. `results.safetensors`
holds each case's result under its id; its metadata `errors` maps the id of a case that
raised to "<exception type>: <message>".

A case with `exact_sums` runs mergekit's method with its whole-tensor reductions correctly
rounded: the rest of its arithmetic, not the CPU's summation order, is then compared
(karcher's iteration amplifies a one-ulp difference in a norm).

A case with `draws` replaces torch.bernoulli (mergekit's only source of randomness, in
sparsify.py) by `u < p`, u being the given uniforms: lazymerge's counter-based draws,
so DARE and DELLA can be compared element for element. A case without draws that draws
anyway is an error.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import ParameterScope, TensorGroup
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_queue: list[torch.Tensor] = []


def _bernoulli(p: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    if args or kwargs or not _queue:
        raise RuntimeError("a draw the case did not provide uniforms for")
    u = _queue.pop(0)
    return (u.view(p.shape) < p).to(p.dtype)


_NORM, _DOT = torch.linalg.vector_norm, torch.dot


def _rounded(exact: float, dtype: torch.dtype) -> torch.Tensor:
    value = torch.tensor(exact, dtype=torch.float64)
    return value.to(dtype) if dtype == torch.float64 else value.float().to(dtype)


def _exact_norm(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    if args or kwargs:
        raise RuntimeError("exact_sums: only whole-tensor norms are replaced")
    return _rounded(math.sqrt(math.fsum((x.double() ** 2).reshape(-1).tolist())), x.dtype)


def _exact_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _rounded(math.fsum((a.double() * b.double()).tolist()), a.dtype)


def run(case: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    exact = case.get("exact_sums", False)
    torch.linalg.vector_norm = _exact_norm if exact else _NORM  # type: ignore[assignment]
    torch.dot = _exact_dot if exact else _DOT  # type: ignore[assignment]
    method = merge_methods.get(case["method"])
    dtype = DTYPES[case["dtype"]]
    order = case["order"]
    inputs = [tensors[k].to(dtype) for k in case["inputs"]]
    ids = [f"m{i}" for i in order]
    has_base = case.get("base", True)
    group = TensorGroup.from_tensors(
        [inputs[i] for i in order],
        ids=ids,
        base_index=order.index(0) if has_base else None,
        name=case["id"],
    )
    parameters: dict[str, Any] = dict(case["shared"])
    for spec in method.spec.input_parameters:
        every = spec.scope == ParameterScope.INPUT or not has_base
        scope = [i for i in order if every or i != 0]
        parameters[spec.name] = {f"m{i}": case["per_input"][i][spec.name] for i in scope}
    _queue[:] = [tensors[k] for k in case["draws"] or ()]
    (result,) = method([group], parameters=parameters, dtype=dtype)
    if _queue:
        raise RuntimeError(f"{len(_queue)} uniforms left undrawn")
    out: torch.Tensor = result.contiguous()
    return out


def main(source: str, target: str) -> None:
    torch.bernoulli = _bernoulli  # type: ignore[assignment]
    with safe_open(source, "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    results, errors = {}, {}
    for case in cases:
        try:
            results[case["id"]] = run(case, tensors)
        except Exception as e:
            errors[case["id"]] = f"{type(e).__name__}: {e}"
    save_file(results, target, metadata={"errors": json.dumps(errors)})


if __name__ == "__main__":
    main(*sys.argv[1:])
