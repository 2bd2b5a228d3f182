"""The benchmark record as a table, a verdict on the targets, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MiB, GiB = 2**20, 2**30
RSS_TARGET = 1.5 * GiB
RATIO_TARGET = 1.5
OVERLAPPED_TARGET = 1.1  # issue 19: against the overlapped copy, at every layer count


def _mk(run: dict[str, Any], key: str) -> Any:
    mk = run.get("mergekit") or {}
    return mk.get(key)


COLUMNS = (
    "layers", "cache", "read GiB", "wrote GiB", "start s", "merge s", "copy s", "rd+wr s", "merge/copy",
    "ovl s", "merge/ovl", "peak MiB", "mergekit s", "mk MiB", "time x", "RSS x", "max diff",
)  # fmt: skip


def _phases(r: dict[str, Any]) -> str:
    """The copy's read and write phases (records before they were timed apart: '-')."""
    if "copy_read_seconds" not in r:
        return "-"
    return f"{r['copy_read_seconds']:.1f}+{r['copy_write_seconds']:.1f}"


def _overlapped(r: dict[str, Any]) -> list[str]:
    """The overlapped copy (benchmarks/copies.py) and the merge's ratio to it; records
    from before it: '-'."""
    if "overlapped_copy_seconds" not in r:
        return ["-", "-"]
    return [f"{r['overlapped_copy_seconds']:.1f}", f"{r['merge_over_overlapped']:.2f}"]


def _row(r: dict[str, Any]) -> list[str]:
    cells = [
        str(r["layers"]), r["cache"], f"{r['bytes_read'] / GiB:.2f}", f"{r['bytes_written'] / GiB:.2f}",
        f"{r['startup_seconds']:.1f}", f"{r['merge_seconds']:.1f}", f"{r['copy_seconds']:.1f}",
        _phases(r), f"{r['merge_over_copy']:.2f}", *_overlapped(r), f"{r['merge_peak_rss'] / MiB:.0f}",
    ]  # fmt: skip
    mk_s, mk_rss = _mk(r, "seconds"), _mk(r, "peak_rss")
    if mk_s:
        diff = _mk(r, "diff").get("max_abs_diff")
        cells += [
            f"{mk_s:.1f}", f"{mk_rss / MiB:.0f}", f"{mk_s / r['merge_seconds']:.2f}",
            f"{mk_rss / r['merge_peak_rss']:.1f}", f"{diff:.2e}",
        ]  # fmt: skip
    else:
        cells += ["-"] * 5
    return cells


def steal_line(what: str, seconds: list[float], cpu: list[float], steal: list[float | None]) -> str:
    """Each merge's time with its CPU-seconds and the host's CPU steal meanwhile: a run
    the host took cores from is slower for no reason of the merge's (benchmarks/host.py)."""
    runs = ", ".join(
        f"{s:.1f} s ({c:.1f} CPU-s, steal {'?' if st is None else f'{st:.0f}'} %)"
        for s, c, st in zip(seconds, cpu, steal, strict=True)
    )
    return f"{what}: merges {runs}"


def table(record: dict[str, Any]) -> str:
    rows = [list(COLUMNS)] + [_row(r) for r in record["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines += [
        f"mergekit at {r['layers']} layers: {_mk(r, 'error')[:300]}"
        for r in record["runs"]
        if _mk(r, "error")
    ]
    lines += [
        steal_line(
            f"{r['layers']} layers", r["merge_runs"], r["merge_cpu_runs"], r["merge_steal_runs"]
        )
        for r in record["runs"]
        if "merge_steal_runs" in r
    ]
    m = record["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / GiB:.0f} GiB, {m['kernel']}; "
        f"torch {m['torch']}, lazymerge {m['lazymerge']}"
    )
    return "\n".join(lines)


def targets(record: dict[str, Any]) -> str:
    runs = record["runs"]
    rss = max(r["merge_peak_rss"] for r in runs)
    ratio = max(r["merge_over_copy"] for r in runs)
    out = [
        f"target peak RSS <= 1.5 GiB: {'met' if rss <= RSS_TARGET else 'MISSED'} (worst {rss / GiB:.2f} GiB)",
        f"target merge/copy <= {RATIO_TARGET}: {'met' if ratio <= RATIO_TARGET else 'MISSED'} (worst {ratio:.2f})",
    ]
    honest = [r["merge_over_overlapped"] for r in runs if "merge_over_overlapped" in r]
    if honest:
        worst = max(honest)
        out.append(
            f"target merge/overlapped copy <= {OVERLAPPED_TARGET}: "
            f"{'met' if worst <= OVERLAPPED_TARGET else 'MISSED'} (worst {worst:.2f})"
        )
    mk = [r for r in runs if _mk(r, "seconds")]
    if mk:
        faster = all(_mk(r, "seconds") > r["merge_seconds"] for r in mk)
        leaner = max(r["merge_peak_rss"] / _mk(r, "peak_rss") for r in mk)
        out.append(
            f"target faster than mergekit: {'met' if faster else 'MISSED'}; worst RSS fraction of mergekit's {leaner:.2f}"
        )
    return "\n".join(out)


NO_PLOT = "plot: skipped (matplotlib is not installed; `make bench` installs it)"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(record: dict[str, Any], path: Path) -> str:
    """Time and peak RSS against layers (PNG); a note instead when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    runs = record["runs"]
    x = [r["layers"] for r in runs]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(x, [r["merge_seconds"] for r in runs], "o-", label="lazymerge")
    ax_t.plot(x, [r["copy_seconds"] for r in runs], "s--", label="plain copy of the same bytes")
    ax_m.plot(x, [r["merge_peak_rss"] / MiB for r in runs], "o-", label="lazymerge")
    mk = [r for r in runs if _mk(r, "seconds")]
    if mk:
        ax_t.plot(
            [r["layers"] for r in mk], [_mk(r, "seconds") for r in mk], "^-", label="mergekit"
        )
        ax_m.plot(
            [r["layers"] for r in mk],
            [_mk(r, "peak_rss") / MiB for r in mk],
            "^-",
            label="mergekit",
        )
    ax_t.set(xlabel="decoder layers (13B-shaped)", ylabel="wall time (s)", title="Time")
    ax_m.set(xlabel="decoder layers (13B-shaped)", ylabel="peak RSS (MiB)", title="Peak memory")
    for ax in (ax_t, ax_m):
        ax.set_xticks(x)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"founding recipe, {runs[0]['cache']} cache, {record['machine']['cores']} cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
