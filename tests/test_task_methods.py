"""The mergekit methods (linear, the task-arithmetic family, sce) against mergekit 0.1.5's
own method code, run on whole tensors in its venv (tests/mergekit_kernels.py), while
lazymerge streams the same tensors in blocks of 1 row (4 for fp32 and fp64 with statistics
passes), 7 rows and the whole tensor, with the same bytes every time.

Exact bits, except where mergekit itself is arbitrary or machine-dependent:
- ties at a top-k threshold (its argsort is unstable): only the tie class may differ,
  and the kept count is mergekit's (`test_kept_counts_match_mergekit`);
- a whole-tensor sum in fp32 or fp64 (the L1 rescale in those work dtypes, SCE's weights):
  mergekit's cascade sum depends on the CPU's vector width and threads, lazymerge's is the
  correctly rounded one: within 1 ulp, or 2^-18 of the operands' size (`assert_matches`);
- DARE's and DELLA's masks: compared through the same uniforms (mergekit's bernoulli
  replaced by `u < p`), on tie-free magnitudes for DELLA (its ranks break ties
  arbitrarily); the real draws are checked for their law.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lazymerge.errors import NumericsError
from lazymerge.meaning.methods import draws, linear, sce, task, vote
from lazymerge.meaning.methods.base import Method, Resolved
from lazymerge.meaning.methods.task import SELECT_PASSES
from lazymerge.recipe.methods import METHOD_PARAMS, Scope

from mergekit_ref import Mergekit, run_kernels

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
SHAPES = {"w2": (64, 48), "w1": (48,), "v600": (600,)}
SEED = 1234
STEPS = (1, 7, None)  # rows per block; None: the whole tensor
# float32 cuts cost two passes of 2^15- and 2^16-bin histograms (select.py), ~4 ms a block
# whatever its size: one-row blocks there would take most of this module's time.
WIDE_STEPS = (4, 7, None)


# --- inputs ------------------------------------------------------------------------


def fine_tunes(shape: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
    """A base and three fine-tunes: a common share of the deltas and a private part, so
    the sign vote splits; some deltas exactly 0 and one row where no model moves."""
    base = torch.randn(shape, generator=gen) * 0.02
    common = torch.randn(shape, generator=gen)
    out = [base]
    for i in range(3):
        delta = 1e-3 * (0.5 * common + torch.randn(shape, generator=gen)) * (1 + 0.5 * i)
        delta.view(-1)[i::11] = 0
        delta[5] = 0
        out.append(base + delta)
    return out


def tie_free(shape: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
    """A zero base and three fine-tunes whose magnitudes are distinct within each row
    (exact in fp16 and bf16): DELLA's ranks are then mergekit's whatever its argsort."""
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    j = torch.arange(cols)
    magnitudes = (1 + (j % 128) / 128) * 2.0 ** (-14 + j // 128).float()
    out = [torch.zeros(shape)]
    for _ in range(3):
        perm = torch.stack([torch.randperm(cols, generator=gen) for _ in range(rows)])
        signs = torch.randint(0, 2, (rows, cols), generator=gen) * 2 - 1
        out.append((magnitudes[perm] * signs).reshape(shape))
    return out


def special(shape: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
    """Fine-tunes whose task vectors hold ±0, ±inf, NaN and subnormals (in fp16), on a
    base that is ±0 in places: what the sign vote must treat as mergekit does."""
    out = fine_tunes(shape, gen)
    flat = [x.view(-1) for x in out]
    flat[0][::13] = 0.0
    flat[0][1::13] = -0.0
    values = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 6e-8, -6e-8, -1e-7])
    for x in flat[1:]:
        at = torch.randperm(x.numel(), generator=gen)[: x.numel() // 6]
        x[at] = values[torch.randint(len(values), (len(at),), generator=gen)]
    return out


def families() -> dict[str, dict[str, list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(7)
    ft = {t: fine_tunes(s, gen) for t, s in SHAPES.items() if t != "v600"}
    zero = {t: [torch.zeros_like(m[0])] + [x - m[0] for x in m[1:]] for t, m in ft.items()}
    zt = {t: tie_free(s, gen) for t, s in SHAPES.items()}
    return {"ft": ft, "z": zero, "zt": zt, "sp": {"w2": special(SHAPES["w2"], gen)}}


FAMILIES = families()


def stored(fam: str, dt: str, tensor: str) -> list[torch.Tensor]:
    """The inputs as a checkpoint in `dt` holds them."""
    return [x.to(DTYPES[dt]) for x in FAMILIES[fam][tensor]]


# --- cases -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    fam: str
    tensor: str
    dt: str
    params: dict[str, Any]  # shared values, and per-input tuples (non-base, or all for linear)
    order: tuple[int, ...] = (0, 1, 2, 3)
    draws: bool = False
    models: int = 3  # non-base inputs

    @property
    def id(self) -> str:
        items = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.params.items()))
        order = "" if self.order == tuple(range(self.models + 1)) else f"@{self.order}"
        mode = "-u" if self.draws else ""
        return f"{self.method}{mode}[{items}]{order}-{self.fam}-{self.tensor}-{self.dt}"

    def resolved(self, seed: int = SEED) -> Resolved:
        """The call the planner would make: defaults filled from the method's table."""
        params = METHOD_PARAMS[self.method].params
        shared: dict[str, Any] = {
            p.name: self.params.get(p.name, p.default) for p in params if p.scope == Scope.SHARED
        }
        per_input: list[dict[str, Any]] = []
        for i in range(self.models + 1):
            per_input.append({})
            for p in params:
                if p.scope == Scope.INPUT or (p.scope == Scope.NON_BASE and i):
                    given = self.params.get(p.name, p.default)
                    at = i - (p.scope == Scope.NON_BASE)
                    per_input[i][p.name] = given[at] if isinstance(given, tuple) else given
        shape = SHAPES[self.tensor]
        return Resolved(self.tensor, shape, self.dt, seed, shared, tuple(per_input), self.order)


def _short(v: Any) -> str:
    if isinstance(v, tuple):
        return "/".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


W = (0.5, 0.3, 0.2)
NEG = (0.6, -0.3, 0.5)


def deterministic(dt: str, tensor: str) -> list[Case]:
    ties_d, crumbs = (0.5, 0.7, 0.3), {"density": (0.6, 0.8, 0.5), "gamma": (0.02, 0.05, 0.1)}
    params: list[tuple[str, dict[str, Any]]] = [
        ("task_arithmetic", {"weight": W}),
        ("task_arithmetic", {"weight": W, "normalize": True}),
        ("task_arithmetic", {"weight": NEG, "lambda": 0.7, "normalize": True}),
        ("ties", {"weight": W, "density": ties_d}),
        ("ties", {"weight": W, "density": ties_d, "rescale": True, "lambda": 1.3}),
        ("ties", {"weight": NEG, "density": ties_d, "normalize": False, "int8_mask": True}),
        ("breadcrumbs", {"weight": W, **crumbs}),
        ("breadcrumbs", {"weight": NEG, **crumbs, "rescale": True, "normalize": True}),
        ("breadcrumbs_ties", {"weight": W, **crumbs}),
        ("breadcrumbs_ties", {"weight": NEG, **crumbs, "normalize": True, "lambda": 0.5}),
        ("sce", {"select_topk": 0.3}),
        ("sce", {}),
        ("linear", {"weight": (0.2, 0.3, 0.5, -0.1)}),
        ("linear", {"weight": (0.2, 0.3, 0.5, 0.4), "normalize": False}),
        ("dare_ties", {"weight": W}),
        ("dare_linear", {"weight": NEG, "normalize": True}),
        ("della", {"weight": W}),
        ("della_linear", {"weight": W, "density": (0.0, 1.0, 1.0)}),  # 0: zeros
    ]
    cases = [Case(m, "ft", tensor, dt, p) for m, p in params]
    for order in ((1, 0, 2, 3), (1, 2, 3, 0)):  # the base listed second; not listed: last
        cases.append(Case("linear", "ft", tensor, dt, {"weight": (0.2, 0.3, 0.5, 0.4)}, order))
    return cases


def with_draws(dt: str) -> list[Case]:
    d = (0.5, 0.6, 0.4)
    unscaled = {"weight": W, "density": d, "rescale": False}
    cases = []
    for tensor in ("w2", "w1"):
        cases += [
            Case("dare_ties", "ft", tensor, dt, {"weight": W, "density": d}, draws=True),
            Case("dare_linear", "ft", tensor, dt, {"weight": NEG, "density": d}, draws=True),
            Case("dare_ties", "ft", tensor, dt, unscaled, draws=True),
        ]
    for tensor in ("w2", "w1", "v600"):
        eps = {"density": d, "epsilon": (0.1, 0.2, 0.3)}
        cases += [
            Case("della", "zt", tensor, dt, {"weight": W, **eps}, draws=True),
            Case("della_linear", "zt", tensor, dt, {"weight": NEG, **eps}, draws=True),
        ]
    return cases


def few(method: str, fam: str, dt: str, models: int = 1, **params: Any) -> Case:
    """A case of `models` fine-tunes on `w2`."""
    return Case(method, fam, "w2", dt, params, tuple(range(models + 1)), models=models)


def kept(dt: str) -> list[Case]:
    """One fine-tune on a zero base: the output is the sparsified delta itself."""
    return [
        few("ties", "z", dt, weight=(1.0,), density=(0.3,)),
        few("breadcrumbs", "z", dt, weight=(1.0,), density=(0.6,), gamma=(0.05,)),
        few("breadcrumbs", "z", dt, weight=(1.0,), density=(0.9,), gamma=(0.3,)),
        few("sce", "z", dt, models=2, select_topk=0.25),
    ]


HALF_AND_SINGLE = ("F16", "BF16", "F32")  # and float64, more briefly
DETERMINISTIC = [c for dt in HALF_AND_SINGLE for t in ("w2", "w1") for c in deterministic(dt, t)]
DETERMINISTIC += deterministic("F64", "w2")
DRAWN = [c for dt in DTYPES for c in with_draws(dt)]
KEPT = [c for dt in HALF_AND_SINGLE for c in kept(dt)]
# The sign vote on ±0, ±inf, NaN and subnormal task vectors (density 1: nothing pruned).
SPECIAL = [
    Case("ties", "sp", "w2", dt, {"weight": NEG, "density": (1.0, 1.0, 1.0), "int8_mask": m})
    for dt in HALF_AND_SINGLE
    for m in (False, True)
]
BAD_DELLA = Case("della", "ft", "w2", "F16", {"weight": W, "density": (0.9, 0.5, 0.5)})


# --- running both ------------------------------------------------------------------


@dataclasses.dataclass
class FakeBlock:
    inputs: list[torch.Tensor]  # fp32, whole tensors
    start: int
    stop: int

    @property
    def shared(self) -> int:
        return self.stop - self.start

    def rows(self, i: int, n: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = self.inputs[i][self.start : self.stop].clone()
        return rows if dtype is None else rows.to(dtype)


def build(case: Case, seed: int = SEED) -> Method:
    call = case.resolved(seed)
    if case.method == "linear":
        return linear.build_weighted(call)
    if case.method == "sce":
        return sce.build(call)
    return task.builder(case.method)(call)


def stream(method: Method, inputs: list[torch.Tensor], step: int | None) -> torch.Tensor:
    """The executor's protocol: every statistics pass over all blocks in row order, then
    `combine` on each block once, in order."""
    rows = inputs[0].shape[0]
    step = step or rows
    spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    stats = None
    for k in range(method.stat_passes()):
        acc = method.stats_pass(k, stats)
        for r0, r1 in spans:
            acc.update(FakeBlock(inputs, r0, r1))
        stats = acc.result()
    return torch.cat([method.combine(FakeBlock(inputs, r0, r1), stats) for r0, r1 in spans])


def ours(case: Case, seed: int = SEED) -> torch.Tensor:
    """lazymerge's result, the same bytes for every block size."""
    inputs = [x.float() for x in stored(case.fam, case.dt, case.tensor)]
    method = build(case, seed)
    steps = WIDE_STEPS if SELECT_PASSES[case.dt] == 2 and method.stat_passes() else STEPS
    results = [stream(method, inputs, step).to(DTYPES[case.dt]) for step in steps]
    for step, r in zip(steps[1:], results[1:], strict=True):
        assert torch.equal(bits(r), bits(results[0])), f"{case.id}: blocks of {step} rows differ"
    return results[0]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(BITS[x.dtype])


def uniforms(case: Case, seed: int = SEED) -> dict[int, torch.Tensor]:
    """Per drawing input, lazymerge's uniforms for the whole tensor (draws.py)."""
    n = math.prod(SHAPES[case.tensor])
    return {
        i: draws.uniforms(draws.stream_key(seed, case.tensor, i), 0, n)
        for i, d in enumerate(case.params.get("density", ()), start=1)
        if d < 1
    }


@pytest.fixture(scope="module")
def reference(mergekit: Mergekit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_mergekit(mergekit.venv, tmp_path_factory.mktemp("kernels"))


def run_mergekit(venv: Path, root: Path) -> dict[str, Any]:
    """Every case through mergekit's method code, in one subprocess."""
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for case in [*DETERMINISTIC, *DRAWN, *KEPT, *SPECIAL, BAD_DELLA]:
        keys = []
        for i, x in enumerate(stored(case.fam, case.dt, case.tensor)[: case.models + 1]):
            keys.append(f"{case.fam}/{case.dt}/{case.tensor}/{i}")
            tensors[keys[-1]] = x.contiguous()
        call = case.resolved()
        u = uniforms(case) if case.draws else {}
        for i, x in u.items():
            tensors[f"u/{case.id}/{i}"] = x
        cases.append(
            {
                "id": case.id, "method": case.method, "inputs": keys, "order": list(case.order),
                "dtype": NAMES[case.dt], "shared": dict(call.shared),
                "per_input": [dict(p) for p in call.per_input],
                "draws": [f"u/{case.id}/{i}" for i in u] if case.draws else None,
            }
        )  # fmt: skip
    return run_kernels(venv, tensors, cases, root)


def theirs(reference: dict[str, Any], case: Case) -> torch.Tensor:
    assert case.id not in reference["errors"], reference["errors"][case.id]
    result: torch.Tensor = reference["results"][case.id]
    return result


# --- what may differ ---------------------------------------------------------------


def tie_class(case: Case) -> torch.Tensor:
    """Flat mask of the elements whose rank mergekit's unstable sort decides: the ties
    straddling a kept range's bound (longhand from mergekit's formulas)."""
    d = DTYPES[case.dt]
    x = stored(case.fam, case.dt, case.tensor)[: case.models + 1]
    n = x[0].numel()
    tie = torch.zeros(n, dtype=torch.bool)
    ranked: list[tuple[torch.Tensor, int, int]] = []  # values, kept range [lo, hi)
    if case.method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        for i in range(1, case.models + 1):
            density = case.params["density"][i - 1]
            if density >= 1:
                continue
            m = (x[i].to(d) - x[0].to(d)).abs().float().reshape(-1)
            if case.method == "ties":
                k = max(1, int(density * n))
                ranked.append((m, n - k, n))
            else:
                t, g = int(density * n), int(case.params["gamma"][i - 1] * n)
                b = max(0, n - t - g)
                ranked.append((m, b, b + t))
    elif case.method == "sce" and case.params.get("select_topk", 1) < 1:
        tvs = torch.stack([xi.to(d) - x[0].to(d) for xi in x[1:]])
        v = torch.var(tvs, dim=0, unbiased=False).abs().float().reshape(-1)
        k = int(torch.count_nonzero(v) * case.params["select_topk"])
        ranked.append((v, n - k, n))
    for values, lo, hi in ranked:
        s = values.sort().values
        for cut in (lo, hi):
            if 0 < cut < n and s[cut - 1] == s[cut]:
                tie |= values == s[cut]
    return tie.reshape(SHAPES[case.tensor])


def whole_sums(case: Case) -> bool:
    """Whether a whole-tensor sum in fp32 or fp64 reaches the bytes: mergekit's cascade
    sum, not correctly rounded (the L1 rescale in the work dtype, SCE's weights)."""
    p = case.resolved().shared
    if case.method == "sce":
        return case.dt in ("F32", "F64")
    if case.method in ("dare_ties", "dare_linear", "della", "della_linear"):
        drops = any(d < 1 for d in case.params.get("density", (1.0,)))
        return bool(p["rescale"]) and drops and case.dt != "BF16"  # work dtype fp32
    return case.method != "linear" and bool(p.get("rescale")) and case.dt in ("F32", "F64")


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place (0 between +0 and -0)."""

    def line(x: torch.Tensor) -> torch.Tensor:
        k = bits(x).long()
        magnitude = k & ((1 << (8 * x.element_size() - 1)) - 1)
        return torch.where(k < 0, -magnitude, magnitude)

    return (line(a) - line(b)).abs()


def assert_matches(case: Case, got: torch.Tensor, want: torch.Tensor) -> dict[str, int]:
    """Bit for bit outside the tie class; where a whole-tensor sum reaches the bytes, within
    1 ulp, or 2^-18 of the operands' size |b| + Σ|δ_i| (the output and the weighted sum may
    cancel; the rescale factor is a few fp32 ulps off)."""
    assert got.dtype == want.dtype == DTYPES[case.dt] and got.shape == want.shape
    tie = tie_class(case)
    # bf16 task vectors of fine-tune size take few distinct values: its tie classes are
    # the largest (~8% of the elements here), fp16's ~1%, fp32's empty.
    assert int(tie.sum()) <= max(8, 0.1 * got.numel()), f"{case.id}: tie class of {int(tie.sum())}"
    differ = (bits(got) != bits(want)) & ~tie
    if whole_sums(case):
        x = [t.double() for t in stored(case.fam, case.dt, case.tensor)[: case.models + 1]]
        scale = x[0].abs() + sum((xi - x[0]).abs() for xi in x[1:])
        near = (ulps(got, want) <= 1) | ((got.double() - want.double()).abs() <= 2**-18 * scale)
        differ &= ~near
    assert not differ.any(), (
        f"{case.id}: {int(differ.sum())} elements differ outside the tie class "
        f"({int(tie.sum())}); first at {differ.nonzero()[0].tolist()}: "
        f"{got[differ][0].item()!r} vs mergekit {want[differ][0].item()!r}"
    )
    return {"tie": int(tie.sum())}


# --- against mergekit --------------------------------------------------------------


@pytest.mark.mergekit
@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: c.id)
def test_deterministic_methods_match_mergekit(case: Case, reference: dict[str, Any]) -> None:
    assert_matches(case, ours(case), theirs(reference, case))


@pytest.mark.mergekit
@pytest.mark.parametrize("case", SPECIAL, ids=lambda c: c.id)
def test_the_sign_vote_on_special_values_matches_mergekit(
    case: Case, reference: dict[str, Any]
) -> None:
    """TIES on task vectors with ±0, ±inf, NaN and subnormals (vote.sign_vote works in
    fp32), in blocks of every size: mergekit's bits, NaN where mergekit has NaN (a NaN's
    payload may differ, with the block size too: torch's own half/float conversions do
    not keep it)."""
    want = theirs(reference, case)
    finite = ~want.isnan()
    inputs = [x.float() for x in stored(case.fam, case.dt, case.tensor)]
    for step in STEPS:
        got = stream(build(case), inputs, step).to(DTYPES[case.dt])
        assert got.isnan().any() and torch.equal(got.isnan(), want.isnan()), step
        differ = bits(got)[finite] != bits(want)[finite]
        assert not differ.any(), f"{case.id}, blocks of {step}: {int(differ.sum())} differ"


@pytest.mark.mergekit
@pytest.mark.parametrize("case", DRAWN, ids=lambda c: c.id)
def test_draws_match_mergekit_given_the_same_uniforms(
    case: Case, reference: dict[str, Any]
) -> None:
    """mergekit's bernoulli fed lazymerge's uniforms: the probabilities (DELLA's ranks in
    the work dtype, bf16's rounded ranks past 256), masks, rescale and vote agree."""
    assert_matches(case, ours(case), theirs(reference, case))


@pytest.mark.mergekit
@pytest.mark.parametrize("case", KEPT, ids=lambda c: c.id)
def test_kept_counts_match_mergekit(case: Case, reference: dict[str, Any]) -> None:
    """On a zero base with one fine-tune (two for sce) the output is what was kept: the
    same number of elements as mergekit keeps, differing only among the ties."""
    got, want = ours(case), theirs(reference, case)
    assert_matches(case, got, want)
    assert int(got.count_nonzero()) == int(want.count_nonzero())
    n, delta = got.numel(), stored(case.fam, case.dt, case.tensor)[1]
    zeros = int((delta == 0).sum())  # the lowest ranks: kept when breadcrumbs keeps them
    if case.method == "ties":
        assert int(got.count_nonzero()) == int(0.3 * n)
    elif case.method == "breadcrumbs":
        kept = int(case.params["density"][0] * n)
        bottom = max(0, n - kept - int(case.params["gamma"][0] * n))
        assert int(got.count_nonzero()) == kept - max(0, zeros - bottom)


def test_mergekit_refuses_what_lazymerge_refuses(reference: dict[str, Any]) -> None:
    assert reference["errors"][BAD_DELLA.id].startswith("ValueError: Epsilon must be chosen")
    with pytest.raises(ValueError, match=r"della: w2: input 1: density 0.9 with epsilon 0.15"):
        build(BAD_DELLA)


# --- the random sparsifiers' law ---------------------------------------------------


def one_model(method: str, dt: str) -> Case:
    if method.startswith("della"):
        return few(method, "zt", dt, weight=(1.0,), density=(0.5,), epsilon=(0.1,))
    return few(method, "zt", dt, weight=(1.0,), density=(0.5,))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_half_the_deltas_survive_rescaled_to_the_same_l1_norm(method: str, dt: str) -> None:
    """On a zero base the output is the sparsified delta: each kept entry is δ·⟦A/A'⟧ in the
    work dtype (fp32, bf16 for bf16), each dropped one 0; DARE keeps where u < ⟦density⟧."""
    case = one_model(method, dt)
    d = DTYPES[dt]
    w = torch.bfloat16 if dt == "BF16" else torch.float32
    delta = stored("zt", dt, "w2")[1].to(w)
    out = ours(case)
    keep = out != 0
    assert abs(float(keep.float().mean()) - 0.5) < 0.02
    a = torch.tensor(float(delta.abs().double().sum())).float().to(w)
    a_kept = torch.tensor(float(delta[keep].abs().double().sum())).float().to(w)
    want = (delta * (a / a_kept)).to(d)
    assert torch.equal(bits(out[keep]), bits(want[keep]))
    if method == "dare_linear":
        u = uniforms(case)[1].view(out.shape)
        assert torch.equal(keep, u < 0.5)


def test_another_seed_draws_another_mask() -> None:
    case = one_model("dare_ties", "F16")
    first, second = ours(case, seed=SEED) != 0, ours(case, seed=SEED + 1) != 0
    assert torch.equal(first, ours(case, seed=SEED) != 0)
    assert 0.4 < float((first != second).float().mean()) < 0.6  # independent halves


# --- plan-time checks, edge cases, what plan prints ---------------------------------


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("ties", {"density": 0.0}, "ties: density 0 is outside (0, 1]"),
        ("dare_ties", {"density": 1.5}, "dare_ties: density 1.5 is outside (0, 1]"),
        ("breadcrumbs", {"density": 0.5, "gamma": 1.0}, "breadcrumbs: gamma 1 is outside [0, 1)"),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": -0.1}, "gamma -0.1 is outside [0, 1)"),
        ("della", {"density": 0.9, "epsilon": 0.15}, "della: density 0.9 with epsilon 0.15: density ± epsilon must lie inside (0, 1)"),
        ("della_linear", {"density": 0.5, "epsilon": 0.5}, "density 0.5 with epsilon 0.5"),
    ],
)  # fmt: skip
def test_bad_parameters_are_named(method: str, values: dict[str, float], message: str) -> None:
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        task.check(method, {}, {"weight": 1.0, **values})


def test_good_parameters_pass() -> None:
    task.check("task_arithmetic", {}, {"weight": 1.0, "density": 7.0})  # ignored by it
    task.check("ties", {}, {"weight": -1.0, "density": 1.0})
    task.check("della", {}, {"weight": 1.0, "density": 1.0, "epsilon": 0.15})  # no pruning
    task.check("della", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15})
    task.check("breadcrumbs", {}, {"weight": 1.0, "density": 0.5, "gamma": 0.0})
    sce.check("sce", {"select_topk": 1.0}, {})
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"sce: select_topk {bad:g} is outside"):
            sce.check("sce", {"select_topk": bad}, {})


def test_della_refuses_a_tensor_with_one_column() -> None:
    call = dataclasses.replace(one_model("della", "F16").resolved(), shape=(64, 1))
    with pytest.raises(ValueError, match=r"della: w2 \[64, 1\] has one element to rank per row"):
        task.builder("della")(call)


def test_an_fp16_l1_norm_past_65504_is_a_numerics_error() -> None:
    """mergekit would write NaN (inf/inf) in the rescale: hazard 3 of docs/methods.md."""
    case = few("ties", "z", "F16", weight=(1.0,), density=(0.5,), rescale=True)
    inputs = [torch.zeros(64, 48), torch.full((64, 48), 30.0)]
    with pytest.raises(
        NumericsError, match=r"w2: the L1 norm of a task vector \(92160\) overflows"
    ):
        stream(build(case), inputs, 7)


@pytest.mark.parametrize("method", ["ties", "della", "sce", "linear"])
def test_a_tensor_with_no_other_input_is_the_base(method: str) -> None:
    params: dict[str, Any] = {"weight": (1.0,) if method == "linear" else ()}
    case = few(method, "ft", "BF16", models=0, **({} if method == "sce" else params))
    base = stored("ft", "BF16", "w2")[0]
    assert torch.equal(bits(stream(build(case), [base.float()], 7)), bits(base))


def test_describe_and_passes() -> None:
    """What `lazymerge plan` prints per tensor, and how often a tensor is read."""
    f16 = {f"{c.method}{i}": build(c) for i, c in enumerate(deterministic("F16", "w2"))}
    assert f16["ties3"].describe() == "ties w=0.5/0.3/0.2 d=0.5/0.7/0.3 normalize"
    assert (
        f16["ties4"].describe() == "ties w=0.5/0.3/0.2 d=0.5/0.7/0.3 rescale normalize lambda=1.3"
    )
    assert (
        f16["breadcrumbs6"].describe() == "breadcrumbs w=0.5/0.3/0.2 d=0.6/0.8/0.5 g=0.02/0.05/0.1"
    )
    assert (
        f16["della16"].describe()
        == "della w=0.5/0.3/0.2 d=1/1/1 e=0.15/0.15/0.15 rescale normalize"
    )
    assert f16["sce10"].describe() == "sce topk=0.3" and f16["sce11"].describe() == "sce"
    assert f16["linear18"].describe() == "linear w=0.3/0.2/0.5/0.4 normalize"  # the recipe's order
    assert f16["task_arithmetic0"].describe() == "task_arithmetic w=0.5/0.3/0.2"
    passes = {k: m.stat_passes() for k, m in f16.items()}
    assert passes["task_arithmetic0"] == passes["linear12"] == passes["dare_ties14"] == 0
    # fp16: one histogram pass for the cuts; one more for the L1 norms; sce: cuts, weights
    assert (passes["ties3"], passes["ties4"], passes["sce10"], passes["sce11"]) == (1, 2, 2, 1)
    f32 = [build(c).stat_passes() for c in deterministic("F32", "w2")]
    assert (f32[3], f32[4], f32[10]) == (2, 3, 3)  # fp32 cuts take two passes
    drawn = {c.id: build(c).stat_passes() for c in with_draws("F16")}
    assert sorted(set(drawn.values())) == [0, 1, 2]  # rescale off; norms; 1-D DELLA's gather


SPECIALS = (0.0, -0.0, math.inf, -math.inf, math.nan, 1e-8, -1e-8, 6e-8, 65504.0, 2048.0, 1.0)


def with_specials(n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """n random task vectors of 37 x 53, ~15 % of the elements special values."""
    x = torch.randn((n, 37, 53), generator=gen) * scale
    pick = torch.rand(x.shape, generator=gen) < 0.15
    specials = torch.tensor(SPECIALS)
    x[pick] = specials[torch.randint(len(specials), (int(pick.sum()),), generator=gen)]
    return x


def assert_same_bits(got: tuple[Any, ...], want: tuple[Any, ...], where: object) -> None:
    """Same dtypes, NaNs in the same places, every other element's bits equal."""
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype and torch.equal(g.isnan(), e.isnan()), where
        finite = ~e.isnan()
        assert torch.equal(bits(g)[finite], bits(e)[finite]), where


def mergekit_vote(deltas: torch.Tensor, weights: torch.Tensor, mask_dtype: torch.dtype) -> Any:
    """ties_merging's arithmetic as mergekit writes it (get_mask with "sum", then the
    masked sums, the divisor's zeros set to 1), in the deltas' dtype."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    mask = sign == majority
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return (deltas * mask).sum(dim=0), divisor


@pytest.mark.parametrize("dt", ["F16", "BF16", "F32", "F64"])
@pytest.mark.parametrize("int8_mask", [False, True])
def test_the_sign_vote_has_mergekits_bits(dt: str, int8_mask: bool) -> None:
    """vote.sign_vote (fp32 work for fp16/bf16) against mergekit's formula in d, written
    longhand, over more inputs and dtypes than the mergekit cases above: the same bits, with ±0, ±inf, NaN, subnormals and sums that round to ±0 among the deltas, and
    negative or zero weights; a NaN's payload may differ (torch's own conversions do not
    keep it), so NaNs are compared by place."""
    d, gen = DTYPES[dt], torch.Generator().manual_seed(5)
    for n, trial in [(n, t) for n in (1, 2, 3, 5, 12, 40) for t in range(6)]:
        x = with_specials(n, 10.0 ** (trial - 4), gen)
        w = (torch.rand(n, generator=gen) * 2 - 0.5).to(d).view(-1, 1, 1)
        w[0] = 0 if trial % 3 == 0 else w[0]
        deltas = x.to(d) * w
        want = mergekit_vote(deltas, w, torch.int8 if int8_mask else d)
        got = vote.sign_vote(deltas.clone(), w)
        assert_same_bits(got, want, (n, trial))


def mergekit_sce_vote(tvs: torch.Tensor, weights: torch.Tensor, mask_dtype: torch.dtype) -> Any:
    """sce_merge's erase step as mergekit writes it, in the task vectors' dtype."""
    sign = tvs.sign().to(mask_dtype)
    majority = (tvs.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    erased = weights * (sign == majority)
    return (tvs * erased).sum(dim=0), torch.sum(erased, dim=0)


@pytest.mark.parametrize("dt", ["F16", "BF16", "F32", "F64"])
@pytest.mark.parametrize("int8_mask", [False, True])
def test_the_sce_vote_has_mergekits_bits(dt: str, int8_mask: bool) -> None:
    """vote.erased_sums (fp32 work, each τ·w rounded to d first) against mergekit's erase
    step in d, written longhand: the same bits over 1-40 inputs with ±0, ±inf, NaN and
    subnormal task vectors, products that underflow or overflow d, and zero, tiny, large,
    infinite and NaN weights; NaNs compared by place (payloads may differ)."""
    d, gen = DTYPES[dt], torch.Generator().manual_seed(6)
    odd_weights = (0.0, 1e-6, 3e4, math.inf, math.nan)
    for n, trial in [(n, t) for n in (1, 2, 3, 5, 12, 40) for t in range(6)]:
        x = with_specials(n, 10.0 ** (trial - 3), gen)
        w = torch.rand(n, generator=gen) / n
        if trial % 2:
            w[0] = odd_weights[(n + trial) % len(odd_weights)]
        w = w.to(d).view(-1, 1, 1)
        tvs = x.to(d)
        want = mergekit_sce_vote(tvs, w, torch.int8 if int8_mask else d)
        got = vote.erased_sums(tvs.clone(), w)
        assert_same_bits(got, want, (n, trial))
