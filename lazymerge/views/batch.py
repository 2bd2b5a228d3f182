"""What a batch did: a table for people, JSON for machines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lazymerge.run.batch import FAILED, Merge
from lazymerge.views.report import human_bytes


def batch_json(merges: Sequence[Merge], seconds: float) -> dict[str, Any]:
    return {
        "ok": all(m.status != FAILED for m in merges),
        "seconds": round(seconds, 3),
        "merges": [
            {
                "recipe": str(m.recipe_path),
                "out": str(m.out),
                "status": m.status,
                "error": m.error or None,
                "seconds": round(m.seconds, 3),
                "bytes_written": m.bytes_written,
                "shards": len(m.shards),
                "kept": m.kept,
                "redone": m.redone,
                "peak_rss": m.peak_rss,
                "index_sha256": m.index_sha256 or None,
            }
            for m in merges
        ],
    }


def batch_table(merges: Sequence[Merge], seconds: float) -> str:
    def shards(m: Merge) -> str:
        notes = [f"{n} {what}" for n, what in ((m.kept, "kept"), (m.redone, "redone")) if n]
        return f"{len(m.shards)}" + (f" ({', '.join(notes)})" if notes else "")

    width = max([len(m.name) for m in merges] + [6])
    counts = [shards(m) for m in merges]
    cw = max([len(c) for c in counts] + [6])
    lines = [f"{'recipe':<{width}}  status   work s   written  {'shards':<{cw}}  index sha256"]
    for m, count in zip(merges, counts, strict=True):
        lines.append(
            f"{m.name:<{width}}  {m.status:<7} {m.seconds:7.1f} {human_bytes(m.bytes_written):>9}"
            f"  {count:<{cw}}  {m.index_sha256[:16] or '-'}"
        )
        # One line, or (LAZYMERGE_DEBUG) a traceback: kept under the recipe's row.
        lines += [f"{'':<{width}}  {line}" for line in m.error.splitlines()]
    failed = sum(m.status == FAILED for m in merges)
    lines.append(
        f"{len(merges) - failed} of {len(merges)} merge(s) complete in {seconds:.1f} s"
        + (f"; {failed} failed: fix and re-run, completed shards are kept" if failed else "")
    )
    return "\n".join(lines)
