"""The geometric methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
arcee_fusion, passthrough) against mergekit 0.1.5's own method code, run on whole tensors
in its venv (tests/mergekit_kernels.py), while lazymerge streams the same tensors in blocks
of 1 row, 7 rows and the whole tensor, with the same bytes every time.

Bit for bit in float16 and bfloat16 compute, and wherever the arithmetic is elementwise
(nearswap, passthrough): mergekit's float32 reductions round to what lazymerge's float64
ones give. In float32 and float64 compute its sums, in an order set by the CPU's vector
width, are a few float32 ulps from lazymerge's correctly rounded ones: within one fp16 ulp.
karcher's iteration amplifies such a difference (a dot product rounded to the other side of
a float16 midpoint moves it): compared loosely with mergekit as it is, and bit for bit with
mergekit given correctly rounded norms and dot products (`exact_sums`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_task_methods import DTYPES, NAMES, bits, stream

from lazymerge.errors import NumericsError, RecipeError
from lazymerge.meaning.methods.base import Method, Resolved
from lazymerge.meaning.methods.registry import BUILDERS, CHECKS
from lazymerge.recipe.methods import METHOD_PARAMS, Scope

from mergekit_ref import Mergekit, run_kernels

SHAPES = {"w2": (64, 48), "w1": (48,)}
STEPS = (1, 7, None)  # rows per block; None: the whole tensor
# karcher's 2 + 3·max_iter passes replay the iterations on every block: one-row blocks
# of a 64-row tensor would take most of this module's time.
KARCHER_STEPS = (5, None)


# --- inputs ------------------------------------------------------------------------


def families() -> dict[str, dict[str, list[torch.Tensor]]]:
    """Inputs, the base first: `ft` a base and three fine-tunes (task vectors of ~5 %,
    partly shared); `rand` four unrelated tensors; `line` a base and multiples of it
    (slerp's colinear branch); `anti` a zero base, δ, -δ, δ (antipodal models); `zero` a
    base, a fine-tune and a zero tensor."""
    gen = torch.Generator().manual_seed(11)
    out: dict[str, dict[str, list[torch.Tensor]]] = {}
    for name, shape in SHAPES.items():
        base = torch.randn(shape, generator=gen) * 0.02
        common = torch.randn(shape, generator=gen)
        deltas = [1e-3 * (0.5 * common + torch.randn(shape, generator=gen)) for _ in range(3)]
        delta = torch.randn(shape, generator=gen) * 1e-3
        out.setdefault("ft", {})[name] = [base] + [base + d for d in deltas]
        out.setdefault("rand", {})[name] = [torch.randn(shape, generator=gen) for _ in range(4)]
        out.setdefault("line", {})[name] = [base, base * 2, base * -1, base * 0.5]
        out.setdefault("anti", {})[name] = [torch.zeros(shape), delta, -delta, delta]
        out.setdefault("zero", {})[name] = [base, base + deltas[0], torch.zeros(shape)]
    return out


FAMILIES = families()


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    fam: str
    tensor: str
    dt: str
    params: dict[str, Any]  # shared values, and per-model tuples (non-base, or every input)
    models: int = 1  # inputs besides the base
    base: bool = True  # False: no base model; input 0 is the first model
    order: tuple[int, ...] | None = None  # the config's order of the inputs; None: as given
    exact_sums: bool = False  # mergekit's whole-tensor norms and dots correctly rounded

    @property
    def inputs(self) -> int:
        return self.models + self.base

    @property
    def id(self) -> str:
        items = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.params.items()))
        extra = ("" if self.base else "-nobase") + (f"@{self.order}" if self.order else "")
        extra += "-exact" * self.exact_sums
        return f"{self.method}[{items}]x{self.models}{extra}-{self.fam}-{self.tensor}-{self.dt}"

    def stored(self) -> list[torch.Tensor]:
        """The inputs as checkpoints in `dt` hold them (without a base: the fine-tunes)."""
        x = FAMILIES[self.fam][self.tensor]
        chosen = x[: self.models + 1] if self.base else x[1 : self.models + 1]
        return [t.to(DTYPES[self.dt]) for t in chosen]

    def resolved(self) -> Resolved:
        """The call the planner would make: defaults filled from the method's table."""
        params = METHOD_PARAMS[self.method].params
        shared = {
            p.name: self.params.get(p.name, p.default) for p in params if p.scope == Scope.SHARED
        }
        per_input: list[dict[str, Any]] = []
        for i in range(self.inputs):
            per_input.append({})
            for p in params:
                if p.scope == Scope.INPUT or (p.scope == Scope.NON_BASE and (i or not self.base)):
                    given = self.params.get(p.name, p.default)
                    at = i - (p.scope == Scope.NON_BASE and self.base)
                    per_input[i][p.name] = given[at] if isinstance(given, tuple) else given
        order = self.order or tuple(range(self.inputs))
        shape = SHAPES[self.tensor]
        return Resolved(self.tensor, shape, self.dt, 0, shared, tuple(per_input), order, self.base)


def _short(v: Any) -> str:
    if isinstance(v, tuple):
        return "/".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def cases(dt: str) -> list[Case]:
    ft = [Case(m, "ft", t, dt, p, n) for t in SHAPES for m, p, n in (
        ("slerp", {"t": 0.3}, 1),
        ("slerp", {"t": 1.2}, 1),
        ("nuslerp", {"weight": (0.6, 0.3)}, 2),
        ("nuslerp", {"weight": (0.6, 0.3), "nuslerp_flatten": False}, 2),
        ("nuslerp", {"weight": (0.5, -0.5), "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2),
        ("multislerp", {"weight": (0.5, 0.3, 0.2)}, 3),
        ("multislerp", {"weight": (0.5, 0.3, 0.4), "normalize_weights": False}, 3),
        ("multislerp", {"weight": (0.7,)}, 1),
        ("karcher", {}, 3),
        ("model_stock", {}, 3),
        ("model_stock", {"filter_wise": True}, 2),
        ("nearswap", {"t": 1e-3}, 1),
        ("arcee_fusion", {}, 1),
        ("passthrough", {"scale": 0.7}, 0),
    )]  # fmt: skip
    w2 = "w2"
    return [
        *ft,
        Case("slerp", "rand", w2, dt, {"t": 0.6}, 1),
        Case("slerp", "line", w2, dt, {"t": 0.4}, 1),  # colinear: linear
        Case("nuslerp", "rand", w2, dt, {"weight": (0.2, 0.6)}, 2, base=False),
        Case("nuslerp", "rand", w2, dt, {"weight": (0.2, 0.6), "nuslerp_flatten": False}, 2, base=False),
        Case("nuslerp", "rand", "w1", dt, {"weight": (1.0, 3.0), "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, base=False),
        Case("nuslerp", "anti", w2, dt, {"weight": (0.5, 0.5), "nuslerp_flatten": False}, 2),
        Case("multislerp", "rand", w2, dt, {"weight": (0.5, 0.3, 0.2)}, 3, base=False),
        Case("multislerp", "anti", w2, dt, {"weight": (0.5, 0.5)}, 2),  # mean 0: linear
        Case("karcher", "rand", w2, dt, {"max_iter": 4.0}, 3),
        Case("karcher", "ft", w2, dt, {"tol": 1e-3}, 3, order=(1, 0, 2, 3)),
        Case("karcher", "zero", w2, dt, {}, 2),  # a zero input: left out of the mean
        Case("karcher", "ft", w2, dt, {}, 3, exact_sums=True),
        Case("karcher", "rand", w2, dt, {"max_iter": 4.0}, 3, exact_sums=True),
        Case("model_stock", "ft", "w1", dt, {"filter_wise": True}, 3),
        Case("nearswap", "rand", w2, dt, {"t": 0.5}, 1),
        Case("arcee_fusion", "rand", w2, dt, {}, 1),
        Case("arcee_fusion", "line", w2, dt, {}, 1),
        Case("passthrough", "rand", w2, dt, {}, 0),
    ]  # fmt: skip


CASES = [c for dt in ("F16", "BF16", "F32") for c in cases(dt)]
CASES += [c for c in cases("F64") if c.method not in ("arcee_fusion", "karcher")][::3]
ANTIPODAL = Case("multislerp", "anti", "w2", "BF16", {"weight": (0.25, 0.5, 0.25)}, 3)


# --- running both ------------------------------------------------------------------


def build(case: Case) -> Method:
    return BUILDERS[case.method](case.resolved())


def result_dtype(case: Case) -> torch.dtype:
    """The dtype mergekit's result has: the compute dtype; arcee_fusion's mask is float32."""
    d = DTYPES[case.dt]
    return torch.promote_types(d, torch.float32) if case.method == "arcee_fusion" else d


def ours(case: Case) -> torch.Tensor:
    """lazymerge's result, the same bytes for every block size."""
    inputs = [x.float() for x in case.stored()]
    method = build(case)
    steps = KARCHER_STEPS if case.method == "karcher" else STEPS
    results = [stream(method, inputs, step).to(result_dtype(case)) for step in steps]
    for step, r in zip(steps[1:], results[1:], strict=True):
        assert torch.equal(bits(r), bits(results[0])), f"{case.id}: blocks of {step} rows differ"
    return results[0]


def run_mergekit(venv: Path, root: Path, all_cases: list[Case]) -> dict[str, Any]:
    """Every case through mergekit's method code, in one subprocess."""
    tensors: dict[str, torch.Tensor] = {}
    listing = []
    for case in all_cases:
        keys = []
        for i, x in enumerate(case.stored(), start=0 if case.base else 1):
            keys.append(f"{case.fam}/{case.dt}/{case.tensor}/{i}")
            tensors[keys[-1]] = x.clone()  # families share tensors: one copy per key
        call = case.resolved()
        listing.append(
            {
                "id": case.id, "method": case.method, "inputs": keys, "order": list(call.order),
                "dtype": NAMES[case.dt], "shared": dict(call.shared),
                "per_input": [dict(p) for p in call.per_input], "draws": None, "base": case.base,
                "exact_sums": case.exact_sums,
            }
        )  # fmt: skip
    return run_kernels(venv, tensors, listing, root)


@pytest.fixture(scope="module")
def reference(mergekit: Mergekit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_mergekit(mergekit.venv, tmp_path_factory.mktemp("geometric"), [*CASES, ANTIPODAL])


def theirs(reference: dict[str, Any], case: Case) -> torch.Tensor:
    assert case.id not in reference["errors"], reference["errors"][case.id]
    result: torch.Tensor = reference["results"][case.id]
    return result


def fp16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of want's fp16 ulp (subnormal spacing below 2^-14)."""
    g, w = got.double(), want.double()
    return (g - w).abs() / (2.0**-10 * torch.clamp(w.abs(), min=2.0**-14))


def exact(case: Case) -> bool:
    """Whether mergekit's bytes are expected exactly: elementwise methods; float16 and
    bfloat16 results, whose float32 reductions round to lazymerge's float64 ones (but
    karcher's iteration amplifies the rare one-ulp miss); karcher given correctly rounded
    norms and dots."""
    if case.method in ("nearswap", "passthrough") or case.exact_sums:
        return True
    return case.dt in ("F16", "BF16") and case.method != "karcher"


def assert_close(case: Case, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit where `exact`; otherwise within one fp16 ulp (mergekit's float32 and
    float64 sums depend on the CPU's vector width; lazymerge's are correctly rounded), and
    karcher within 8 ulps of float16 (a dot product rounded to the other side of a float16
    midpoint moves its iteration; mergekit's own result moves with the CPU)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype)
    differ = bits(got) != bits(want)
    if exact(case):
        assert not differ.any(), f"{case.id}: {int(differ.sum())} of {got.numel()} differ"
    bound = 8.0 if case.method == "karcher" else 1.0
    worst = float(fp16_ulps(got[differ], want[differ]).max()) if differ.any() else 0.0
    assert worst <= bound, f"{case.id}: {worst:.2f} fp16 ulps"


# --- against mergekit --------------------------------------------------------------


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_geometric_methods_match_mergekit(case: Case, reference: dict[str, Any]) -> None:
    assert_close(case, ours(case), theirs(reference, case))


def test_antipodal_models_fail_as_in_mergekit(reference: dict[str, Any]) -> None:
    """Three models whose weighted unit vectors cancel: mergekit raises, lazymerge stops
    with a NumericsError naming the tensor (bfloat16: its eps comparison works)."""
    assert reference["errors"][ANTIPODAL.id].startswith("ValueError: The weighted sum")
    with pytest.raises(NumericsError, match=r"w2: multislerp: the weighted mean of the unit"):
        ours(ANTIPODAL)


def test_float16_eps_guards_never_fire() -> None:
    """In float16 mergekit's 1e-8 rounds to 0: two antipodal models do not fall back to
    the linear blend (0 < 0 is false) and give NaN, as mergekit does (compared above)."""
    linear, nan = (
        Case("multislerp", "anti", "w2", dt, {"weight": (0.5, 0.5)}, 2) for dt in ("BF16", "F16")
    )
    x = linear.stored()
    assert torch.equal(ours(linear), (x[1] * 0.5 + x[2] * 0.5) + x[0])  # δ/2 - δ/2: zeros
    assert ours(nan).isnan().all()


# --- the pieces: passes, what plan prints, plan-time refusals --------------------------


def test_passes_and_describe() -> None:
    """What `lazymerge plan` prints per tensor, and how often a tensor is read."""
    got = {
        c.id.split("-ft-")[0]: (build(c).stat_passes(), build(c).describe())
        for c in cases("F16") if c.fam == "ft" and c.tensor == "w2" and not c.order
    }  # fmt: skip
    assert got == {
        "slerp[t=0.3]x1": (1, "slerp t=0.3"),
        "slerp[t=1.2]x1": (1, "slerp t=1.2"),
        "nuslerp[weight=0.6/0.3]x2": (2, "nuslerp w=0.6/0.3 t=0.3333 whole"),
        "nuslerp[nuslerp_flatten=False,weight=0.6/0.3]x2": (0, "nuslerp w=0.6/0.3 t=0.3333 rows"),
        "nuslerp[nuslerp_flatten=False,nuslerp_row_wise=True,weight=0.5/-0.5]x2": (
            2, "nuslerp w=0.5/-0.5 t=0.5 columns"
        ),
        "multislerp[weight=0.5/0.3/0.2]x3": (4, "multislerp w=0.5/0.3/0.2 normalize"),
        "multislerp[normalize_weights=False,weight=0.5/0.3/0.4]x3": (4, "multislerp w=0.5/0.3/0.4"),
        "multislerp[weight=0.7]x1": (0, "multislerp w=0.7 normalize"),
        "karcher[]x3": (32, "karcher max_iter=10 tol=1e-05"),
        "karcher[]x3-exact": (32, "karcher max_iter=10 tol=1e-05"),
        "model_stock[]x3": (1, "model_stock"),
        "model_stock[filter_wise=True]x2": (0, "model_stock filter_wise"),
        "nearswap[t=0.001]x1": (0, "nearswap t=0.001"),
        "arcee_fusion[]x1": (1, "arcee_fusion"),
        "passthrough[scale=0.7]x0": (0, "passthrough scale=0.7"),
    }  # fmt: skip
    one_d = {c.method: build(c).stat_passes() for c in cases("F32") if c.tensor == "w1"}
    assert one_d["model_stock"] == 1 and one_d["arcee_fusion"] == 1  # one row: gathered
    assert build(Case("arcee_fusion", "ft", "w2", "F32", {})).stat_passes() == 2  # fp32 cuts
    no_base = Case("nuslerp", "rand", "w2", "F16", {"weight": (1.0, 1.0)}, 2, base=False)
    assert build(no_base).describe() == "nuslerp w=1/1 t=0.5 whole (no base)"


def test_karcher_stops_reading_once_converged() -> None:
    """mergekit breaks when the tangent's norm falls below tol: the passes left read no row."""
    case = Case("karcher", "ft", "w2", "BF16", {}, 3)
    inputs = [x.float() for x in case.stored()]
    method, reads, stats = build(case), [], None

    class Counting:
        def __init__(self, r0: int, r1: int) -> None:
            self.start, self.stop, self.shared = r0, r1, r1 - r0

        def rows(
            self, i: int, n: int | None = None, dtype: torch.dtype | None = None
        ) -> torch.Tensor:
            reads.append(k)
            return inputs[i][self.start : self.stop].to(dtype or torch.float32, copy=True)

    for k in range(method.stat_passes()):
        acc = method.stats_pass(k, stats)
        acc.update(Counting(0, 64))
        stats = acc.result()
    assert len(stats["steps"]) < 10 and max(reads) < method.stat_passes() - 1


@pytest.mark.parametrize(
    ("method", "shared", "message"),
    [
        ("karcher", {"max_iter": 2.5}, "karcher: max_iter 2.5 is not a whole number >= 0"),
        ("karcher", {"max_iter": -1.0}, "karcher: max_iter -1 is not a whole number >= 0"),
    ],
)
def test_bad_parameters_are_named(method: str, shared: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CHECKS[method](method, shared, {})
    CHECKS[method](method, {"max_iter": 3.0}, {})


def test_arcee_fusion_refuses_float64() -> None:
    with pytest.raises(RecipeError, match=r"arcee_fusion: w2: dtype float64 is not supported"):
        build(Case("arcee_fusion", "ft", "w2", "F64", {}))


@pytest.mark.parametrize(
    ("method", "inputs", "models", "message"),
    [
        ("slerp", 3, 2, "slerp merges exactly 2 models, the base included; this config has 3"),
        ("nearswap", 1, 0, "nearswap merges exactly 2 models, the base included; this config has 1"),
        ("arcee_fusion", 3, 2, "arcee_fusion merges exactly 2 models"),
        ("nuslerp", 2, 1, "nuslerp merges exactly 2 models, besides the base; this config has 1"),
        ("model_stock", 2, 1, "model_stock merges at least 3 models, the base included"),
        ("passthrough", 2, 1, "passthrough merges exactly 1 model, the base included; this config has 2"),
        ("multislerp", 1, 0, "multislerp merges at least 1 model, besides the base; this config has 0"),
    ],
)  # fmt: skip
def test_input_counts_are_one_line(method: str, inputs: int, models: int, message: str) -> None:
    """What the planner refuses before anything is read (mergekit's InputContract)."""
    assert (METHOD_PARAMS[method].inputs.problem(method, inputs, models) or "").startswith(message)
    ok = {"slerp": (2, 1), "nuslerp": (3, 2), "model_stock": (4, 3), "karcher": (1, 0)}
    for name, (n, m) in ok.items():
        assert METHOD_PARAMS[name].inputs.problem(name, n, m) is None


def test_quartiles_rank_negatives_and_nans_as_torch_sorts() -> None:
    """arcee_fusion's importances can round below 0 (a KL sum) or be NaN (a float16
    probability of 0): the streamed quartiles are torch.sort's values at mergekit's ranks."""
    from lazymerge.meaning.methods.fusion import Quantiles, quartile_ranks

    gen = torch.Generator().manual_seed(5)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        values = torch.randn(40, 30, generator=gen).to(dt)
        values[3, :] = float("nan")
        values[7, :5] = 0.0
        values[9, :5] = -0.0
        ranks = quartile_ranks(values.numel())
        quantiles = Quantiles(dt, ranks)
        for _ in range(quantiles.passes):
            for r in range(0, 40, 7):
                quantiles.update(values[r : r + 7])
            quantiles.next_pass()
        want = torch.sort(values.reshape(-1)).values[list(ranks)]
        assert quantiles.values() == want.tolist()
        quantiles = Quantiles(dt, (1199,))  # the last rank: a NaN
        for _ in range(quantiles.passes):
            quantiles.update(values)
            quantiles.next_pass()
        assert math.isnan(quantiles.values()[0])
