"""python -m benchmarks.reads RECIPE: the byte ranges a merge reads, as JSON on stdout.

The copy baseline reads exactly these ranges, so merge and baseline move the same bytes.
"""

from __future__ import annotations

import json
import sys

from lazymerge.plan import build_plan
from lazymerge.recipe import load_recipe


def main(argv: list[str]) -> int:
    plan = build_plan(load_recipe(argv[0]))
    ranges: list[list[object]] = []
    for ref in plan.reads():
        last = ranges[-1] if ranges else None
        if last is not None and last[0] == str(ref.file) and last[1] + last[2] == ref.offset:  # type: ignore[operator]
            last[2] += ref.nbytes  # type: ignore[operator]
        else:
            ranges.append([str(ref.file), ref.offset, ref.nbytes])
    json.dump(
        {
            "reads": ranges,
            "bytes_to_read": plan.bytes_to_read,
            "bytes_to_write": plan.bytes_to_write,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
