"""The report's output: a fixed-width table, a summary line, the rows as JSON."""

from __future__ import annotations

from typing import Sequence

from .check import Row, failing


def _tc_cell(row: Row) -> str:
    s = row.result["sass"]
    parts = [f"{op}:{s[op]}" for op in ("HGMMA", "HMMA", "DMMA") if s[op]]
    return " ".join(parts) or "-"


def format_table(rows: Sequence[Row]) -> str:
    """The report as a fixed-width table, one row per compiled (or pruned) config."""
    head = ("arch", "kernel", "case", "dtype", "config", "regs", "stack", "smem KiB", "tensor ops", "s", "status")
    lines = []
    for r in rows:
        if r.result is None:
            cells = ("-", "-", "-", "-", "-", "pruned (keep)")
        elif r.result.get("error"):
            cells = ("-", "-", "-", "-", f"{r.result['seconds']:.1f}", "FAIL " + "; ".join(r.failures))
        else:
            res = r.result
            status = ("pruned, " if r.pruned else "") + ("ok" if not r.failures else
                                                         ("would fail: " if r.pruned else "FAIL ")
                                                         + "; ".join(r.failures))
            if r.known:
                status += " (known: " + "; ".join(r.known) + ")"
            cells = (str(res["regs"]), str(res["stack"]), f"{(res['shared'] + res['static_shared']) / 1024:.1f}",
                     _tc_cell(r), f"{res['seconds']:.1f}", status)
        lines.append((f"sm_{r.arch}", r.kernel, r.case, r.dtype, r.config) + cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln) for ln in lines]
    return "\n".join(out)


def summary(rows: Sequence[Row], seconds: float | None = None) -> str:
    """``"N rows compiled (J distinct compiles), P pruned by keep(), F failing[, S s]"``."""
    compiled = [r for r in rows if r.result is not None]
    bad = failing(rows)
    pruned = sum(r.pruned for r in rows)
    pruned_ok = sum(r.pruned and r.result is not None and not r.failures for r in rows)
    text = (f"{len(compiled)} rows compiled ({len({r.job for r in compiled})} distinct compiles), "
            f"{pruned} pruned by keep()" + (f" ({pruned_ok} of them would pass)" if pruned_ok else "")
            + f", {len(bad)} failing")
    known = [r for r in rows if not r.pruned and r.known]
    if known:
        text += f" ({len(known)} more with known spills: no clean tile under this Triton)"
    if seconds is not None:
        text += f", {seconds:.0f} s"
    return text


def rows_to_json(rows: Sequence[Row]) -> list[dict]:
    """The rows as JSON-able dicts (what ``check --json`` writes and ``tiles --from`` reads)."""
    return [{"arch": r.arch, "family": r.family, "case": r.case, "dtype": r.dtype, "kernel": r.kernel,
             "config": r.config, "pruned": r.pruned, "result": r.result, "failures": r.failures, "known": r.known,
             "constexprs": dict(r.job.constexprs) if r.job else None,
             "options": dict(r.job.options) if r.job else None} for r in rows]
