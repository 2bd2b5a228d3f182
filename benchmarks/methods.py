"""python -m benchmarks.methods [--layers N] [--rounds R] [--mergekit-rounds M] [--no-mergekit]
[--cases C,...] [--work DIR]: mergekit configs (TIES, DARE-TIES, SLERP, a passthrough
frankenmerge) on 13B-shaped fine-tunes, against mergekit.

A 13B-shaped base and three fine-tunes of it (`benchmarks.generate --finetunes 3`, made
once and kept in the work directory); one mergekit YAML per case (benchmarks/method_cases.py),
run as it is by `lazymerge merge` and by `mergekit-yaml`, and a plain copy of the bytes the
merge reads and writes. Rounds alternate lazymerge / copy / mergekit so the disk's drifts
hit all three alike; medians are reported. The orchestrator never imports torch (peak RSS
is each child's own, see runner.run_child); the output comparison runs in a child too.
Cases a run leaves out keep their earlier record in the JSON file (same layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import mergekit
from benchmarks.copies import overlapped_copy
from benchmarks.method_cases import CASES, FINETUNES, SEED, case_config
from benchmarks.report import steal_line
from benchmarks.runner import Child, CopyTimes, copy_baseline, drop_caches, run_child, steal_pct

HERE = Path(__file__).resolve().parent
MiB, GiB = 2**20, 2**30
# The goals, against mergekit's same config in the same run; a passthrough is a
# copy, so against the copy of the same bytes too.
SPEEDUP_GOAL, RSS_FRACTION_GOAL, PEAK_GOAL = 5.0, 0.1, 512 * MiB
COPY_GOAL = {"passthrough": 1.1}


def ensure_models(work: Path, layers: int, tiny: bool) -> tuple[Path, dict[str, Any]]:
    """work/models-N: base + fine-tunes, generated once (a marker, written last, says so)."""
    models = work / f"models-{layers}{'-tiny' if tiny else ''}"
    marker = models / "complete.json"
    if marker.is_file():
        return models, {**json.loads(marker.read_text()), "cached": True}
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    cmd = [sys.executable, "-m", "benchmarks.generate", str(models), "--layers", str(layers)]
    cmd += ["--finetunes", str(FINETUNES)] + (["--tiny"] if tiny else [])
    gen = run_child(cmd, "generate")
    info = {"layers": layers, "seconds": gen.seconds, "peak_rss": gen.peak_rss}
    marker.write_text(json.dumps(info) + "\n")
    return models, {**info, "cached": False}


@dataclass
class Case:
    """One method's config and everything measured for it, round by round."""

    name: str
    config: Path
    reads: list[list[Any]]
    bytes_read: int
    merges: list[Child] = field(default_factory=list)
    copies: list[CopyTimes] = field(default_factory=list)
    overlapped: list[float] = field(default_factory=list)  # benchmarks/copies.py, seconds
    mergekits: list[Child] = field(default_factory=list)
    bytes_written: int = 0
    diff: dict[str, Any] | None = None


def prepare_case(work: Path, models: Path, name: str, layers: int) -> Case:
    config = work / f"{name}.yml"
    config.write_text(yaml.safe_dump(case_config(models, name, layers), sort_keys=False))
    cmd = [sys.executable, "-m", "benchmarks.reads", str(config)]
    plan = json.loads(run_child(cmd, "plan").stdout)
    return Case(name, config, plan["reads"], plan["bytes_to_read"])


@dataclass(frozen=True)
class Settings:
    work: Path
    models: Path
    cold: bool
    mergekit: Path | None  # mergekit-yaml, or None to leave it out


def run_case_round(case: Case, s: Settings, with_mergekit: bool) -> bool:
    """lazymerge, the copy, mergekit (when asked) once each; True if every drop worked."""
    out, mk_out, copy = s.work / "lm-out", s.work / "mk-out", s.work / "copy"
    for d in (out, mk_out, copy):
        shutil.rmtree(d, ignore_errors=True)
    dropped = drop_caches(s.cold)
    merge = [sys.executable, "-m", "lazymerge", "merge", str(case.config), "-o", str(out), "-q"]
    case.merges.append(run_child(merge, f"lazymerge merge ({case.name})"))
    sizes = [p.stat().st_size for p in sorted(out.glob("*.safetensors"))]
    case.bytes_written = sum(sizes)
    dropped = drop_caches(s.cold) and dropped
    case.copies.append(copy_baseline(case.reads, sizes, copy))
    shutil.rmtree(copy)
    dropped = drop_caches(s.cold) and dropped
    case.overlapped.append(overlapped_copy(case.reads, sizes, copy))
    shutil.rmtree(copy)
    if with_mergekit and s.mergekit is not None:
        dropped = drop_caches(s.cold) and dropped
        cmd = mergekit.command(s.mergekit, case.config, mk_out, s.work / "mk-lora-cache")
        cmd += ["--device", "cpu", "--random-seed", str(SEED)]
        case.mergekits.append(run_child(cmd, f"mergekit-yaml ({case.name})"))
        if case.diff is None:  # the outputs are the same every round: compare once
            case.diff = compare_child(out, mk_out, case.config)
    for d in (out, mk_out):
        shutil.rmtree(d, ignore_errors=True)
    return dropped


def compare_child(lm: Path, mk: Path, config: Path) -> dict[str, Any]:
    """compare_outputs in a child process (it imports torch; this process must not)."""
    code = "import sys, json; from benchmarks.method_cases import compare_outputs as c; "
    code += "json.dump(c(*sys.argv[1:]), sys.stdout)"
    cmd = [sys.executable, "-c", code, str(lm), str(mk), str(config)]
    try:  # a comparison that fails must not cost the run's timings
        return dict(json.loads(run_child(cmd, "compare").stdout))
    except RuntimeError as e:
        return {"error": str(e)}


def mergekit_version(exe: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    return run_child([str(exe.parent / "python"), "-c", code], "mergekit version").stdout.strip()


def summary(case: Case) -> dict[str, Any]:
    """One case's record: runs, medians, ratios, the comparison."""
    lm = statistics.median(m.seconds for m in case.merges)
    copy = statistics.median(c.seconds for c in case.copies)
    rss = max(m.peak_rss for m in case.merges)
    out: dict[str, Any] = {
        "case": case.name,
        "config": yaml.safe_load(case.config.read_text()),
        "bytes_read": case.bytes_read,
        "bytes_written": case.bytes_written,
        "lazymerge_runs": [round(m.seconds, 2) for m in case.merges],
        "lazymerge_cpu_runs": [round(m.cpu_seconds, 2) for m in case.merges],
        "lazymerge_steal_runs": [steal_pct(m) for m in case.merges],
        "lazymerge_seconds": lm,
        "lazymerge_peak_rss": rss,
        "copy_runs": [round(c.seconds, 2) for c in case.copies],
        "copy_seconds": copy,
        "copy_read_seconds": statistics.median(c.read for c in case.copies),
        "copy_write_seconds": statistics.median(c.write for c in case.copies),
        "lazymerge_over_copy": lm / copy,
    }
    if case.overlapped:  # the honest baseline (issue 19): reads and writes overlapped
        ovl = statistics.median(case.overlapped)
        out["overlapped_runs"] = [round(x, 2) for x in case.overlapped]
        out["overlapped_seconds"] = ovl
        out["lazymerge_over_overlapped"] = lm / ovl
    if case.mergekits:
        mk = statistics.median(m.seconds for m in case.mergekits)
        mk_rss = max(m.peak_rss for m in case.mergekits)
        out["mergekit"] = {
            "runs": [round(m.seconds, 2) for m in case.mergekits],
            "seconds": mk,
            "peak_rss": mk_rss,
            "over_copy": mk / copy,
            "speedup": mk / lm,
            "rss_fraction": rss / mk_rss,
            "diff": case.diff,
        }
    return out


COLUMNS = (
    "case", "read GiB", "wrote GiB", "lazymerge runs s", "lm s", "copy runs s", "copy s",
    "lm/copy", "ovl copy s", "lm/ovl", "lm MiB", "mergekit runs s", "mk s", "mk/copy", "mk MiB", "speed-up",
    "RSS frac", "max diff", ">1 ulp",
)  # fmt: skip


def _row(r: dict[str, Any]) -> list[str]:
    cells = [
        r["case"], f"{r['bytes_read'] / GiB:.2f}", f"{r['bytes_written'] / GiB:.2f}",
        ", ".join(f"{x:.1f}" for x in r["lazymerge_runs"]), f"{r['lazymerge_seconds']:.1f}",
        ", ".join(f"{x:.1f}" for x in r["copy_runs"]), f"{r['copy_seconds']:.1f}",
        f"{r['lazymerge_over_copy']:.2f}",
        f"{r['overlapped_seconds']:.1f}" if "overlapped_seconds" in r else "-",
        f"{r['lazymerge_over_overlapped']:.2f}" if "overlapped_seconds" in r else "-",
        f"{r['lazymerge_peak_rss'] / MiB:.0f}",
    ]  # fmt: skip
    mk = r.get("mergekit")
    if mk is None:
        return cells + ["-"] * 8
    diff = mk["diff"] or {}
    return [
        *cells,
        ", ".join(f"{x:.1f}" for x in mk["runs"]), f"{mk['seconds']:.1f}",
        f"{mk['over_copy']:.2f}", f"{mk['peak_rss'] / MiB:.0f}", f"{mk['speedup']:.2f}",
        f"{mk['rss_fraction']:.3f}", f"{diff.get('max_abs_diff', 0.0):.2e}", _over(diff),
    ]  # fmt: skip


def _over(diff: dict[str, Any]) -> str:
    """Share of elements more than 1 ulp apart; for TIES, how many of those are off ties."""
    if not diff or "error" in diff:
        return "error" if diff else "-"
    share = f"{diff['over_1_ulp'] / diff['elements']:.2%}"
    if "over_1_ulp_off_ties" in diff:
        share += f" ({diff['over_1_ulp_off_ties']} off ties)"
    return share


def table(record: dict[str, Any]) -> str:
    rows = [list(COLUMNS)] + [_row(r) for r in record["cases"]]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|")
    lines += [
        steal_line(
            r["case"], r["lazymerge_runs"], r["lazymerge_cpu_runs"], r["lazymerge_steal_runs"]
        )
        for r in record["cases"]
        if "lazymerge_steal_runs" in r
    ]
    return "\n".join(lines)


def verdict(record: dict[str, Any]) -> str:
    """The issue's goals, case by case: met or MISSED, with the figure."""
    lines = []
    for r in record["cases"]:
        peak = r["lazymerge_peak_rss"]
        lines.append(
            f"{r['case']}: peak RSS <= 512 MiB {'met' if peak <= PEAK_GOAL else 'MISSED'} "
            f"({peak / MiB:.0f} MiB)"
        )
        mk = r.get("mergekit")
        if mk:
            fast, lean = mk["speedup"] >= SPEEDUP_GOAL, mk["rss_fraction"] <= RSS_FRACTION_GOAL
            lines.append(
                f"{r['case']}: >= 5x faster than mergekit {'met' if fast else 'MISSED'} "
                f"({mk['speedup']:.2f}x); <= 1/10 of its RSS {'met' if lean else 'MISSED'} "
                f"({mk['rss_fraction']:.3f})"
            )
        goal, ratio = COPY_GOAL.get(r["case"]), r["lazymerge_over_copy"]
        if goal is not None:
            met = "met" if ratio <= goal else "MISSED"
            lines.append(f"{r['case']}: within {goal}x of the copy {met} ({ratio:.2f}x)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the models, then the rounds; the record."""
    args.work.mkdir(parents=True, exist_ok=True)
    models, gen = ensure_models(args.work, args.layers, args.tiny)
    exe, why = (None, "--no-mergekit") if args.no_mergekit else mergekit.ensure_mergekit(args.work)
    s = Settings(args.work, models, not args.warm, exe)
    cases = [prepare_case(args.work, models, name, args.layers) for name in args.cases]
    mk_rounds = args.rounds if args.mergekit_rounds is None else args.mergekit_rounds
    cold, loads = True, []
    for r in range(args.rounds):
        for case in cases:
            loads.append([round(x, 2) for x in os.getloadavg()])
            print(
                f"[methods] round {r + 1}/{args.rounds}: {case.name}", file=sys.stderr, flush=True
            )
            cold = run_case_round(case, s, r < mk_rounds) and cold
    return {
        "generator": gen,
        "cache": "cold" if cold else "warm",
        "mergekit": mergekit_version(exe) if exe else f"not run: {why}",
        "load_averages": loads,  # 1, 5, 15 min, before each case of each round
        "cases": [summary(c) for c in cases],
    }


def _cases(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: cases are {', '.join(CASES)}")
    return names


def keep_earlier_cases(record: dict[str, Any], path: Path) -> None:
    """Cases this run left out keep their record from `path` (same layers and size), each
    with the run it came from under "run"; the cases in CASES order."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if (old.get("layers"), old.get("tiny", False)) != (record["layers"], record["tiny"]):
        return
    ran = {c["case"] for c in record["cases"]}
    keys = ("date", "command", "machine", "cache", "mergekit", "load_averages")
    origin = {k: old.get(k) for k in keys}
    kept = [{**c, "run": c.get("run", origin)} for c in old.get("cases", [])]
    cases = record["cases"] + [c for c in kept if c["case"] not in ran]
    order = {name: k for k, name in enumerate(CASES)}
    record["cases"] = sorted(cases, key=lambda c: order.get(c["case"], len(CASES)))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import machine  # its module runs nothing on import

    parser = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__)
    parser.add_argument(
        "--layers", type=int, default=2, help="13B-shaped decoder layers (default 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--mergekit-rounds", type=int, default=None,
                        help="run mergekit in only the first M rounds (default: every round)")  # fmt: skip
    parser.add_argument("--no-mergekit", action="store_true", help="leave mergekit out")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("LAZYMERGE_BENCH_CACHE", HERE / ".cache")) / "methods",
                        help="models (kept), outputs (removed each round), mergekit's venv")  # fmt: skip
    parser.add_argument("--json", type=Path, default=HERE / "results" / "methods.json")
    parser.add_argument("--warm", action="store_true", help="never drop the page cache")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model (smoke test)")
    parser.add_argument("--cases", type=_cases, default=CASES,
                        help=f"comma-separated, of {','.join(CASES)} (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "command": "python -m benchmarks.methods "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "layers": args.layers,
        "tiny": args.tiny,
        **run(args),
    }
    record["wall_seconds"] = round(time.monotonic() - started, 1)
    print(table(record))
    print(verdict(record))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    keep_earlier_cases(record, args.json)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
