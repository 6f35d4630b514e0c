"""Summarise a margin log: how far below its allowed error each check stayed.

Record one by running the suite with the log switched on, then summarise it::

    GRADKERNELS_MARGIN_LOG=/tmp/margins.jsonl python -m pytest -m "not slow"
    python -m gradkernels.testing.margins /tmp/margins.jsonl --dtype float64

The margin of a check is ``allowed / error`` at the element nearest its limit (``ratio``; the check
passes above 1); ``floor_ratio`` is the smallest ``floor / error`` (how far the rounding-error bound
alone covers the error, without the torch term). Checks without any error (exact results) have no ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

__all__ = ["read", "summarise", "main"]


def read(path: str) -> list[dict]:
    """The entries of a margin log (one JSON object per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(entries: list[dict], dtype: str | None = "float64") -> dict:
    """Counts and the smallest margins of the entries of ``dtype`` (all dtypes when None).

    Returns a dict: ``checks`` (number), ``exact`` (checks with no error), ``failed``, ``by_kind``
    (checks per floor kind), ``min_ratio`` / ``min_floor_ratio`` (None when nothing had an error),
    ``worst`` (the entries sorted by ratio, smallest first), ``by_file`` ({test file: smallest ratio}).
    """
    chosen = [e for e in entries if dtype is None or e.get("dtype") == dtype]
    with_err = [e for e in chosen if e.get("ratio") is not None]
    floors = [e["floor_ratio"] for e in chosen if e.get("floor_ratio") is not None]
    by_kind: dict = defaultdict(int)
    by_file: dict = {}
    for e in chosen:
        by_kind[e.get("floor_kind")] += 1
        if e.get("ratio") is not None:
            file = (e.get("test") or "?").split("::")[0]
            by_file[file] = min(by_file.get(file, math.inf), e["ratio"])
    return {
        "checks": len(chosen),
        "exact": len(chosen) - len(with_err),
        "failed": sum(1 for e in chosen if not e.get("ok")),
        "by_kind": dict(by_kind),
        "min_ratio": min((e["ratio"] for e in with_err), default=None),
        "min_floor_ratio": min(floors, default=None),
        "worst": sorted(with_err, key=lambda e: e["ratio"]),
        "by_file": dict(sorted(by_file.items())),
    }


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def format_summary(summary: dict, top: int = 15) -> str:
    lines = [
        f"checks: {summary['checks']} ({summary['exact']} exact, {summary['failed']} failed); "
        f"floors: {', '.join(f'{k} {v}' for k, v in sorted(summary['by_kind'].items(), key=str))}",
        f"smallest allowed/error: {_fmt(summary['min_ratio'])}; smallest floor/error: "
        f"{_fmt(summary['min_floor_ratio'])}",
        "",
        "smallest margin per test file:",
    ]
    lines += [f"  {file}: {_fmt(ratio)}" for file, ratio in summary["by_file"].items()]
    lines += ["", f"the {min(top, len(summary['worst']))} smallest margins (allowed/error, floor/error, "
              "error, allowed, check):"]
    for e in summary["worst"][:top]:
        lines.append(f"  {_fmt(e['ratio']):>8} {_fmt(e.get('floor_ratio')):>8}  {_fmt(e['worst_err'], '.2e')} "
                     f"{_fmt(e['worst_allowed'], '.2e')}  {e.get('test')} [{e.get('name')}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradkernels.testing.margins", description=__doc__.split("\n")[0])
    parser.add_argument("log", help="a file written with GRADKERNELS_MARGIN_LOG")
    parser.add_argument("--dtype", default="float64", help="dtype to summarise ('all' for every dtype)")
    parser.add_argument("--top", type=int, default=15, help="how many of the smallest margins to list")
    args = parser.parse_args(argv)
    summary = summarise(read(args.log), None if args.dtype == "all" else args.dtype)
    print(format_summary(summary, args.top))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
