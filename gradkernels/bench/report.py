"""Output of a run: aligned text tables, a CSV with one row per measurement, PNG plots.

Plots need matplotlib (the ``bench`` extra); without it they are skipped with a message.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Iterable, Sequence

from .harness import CSV_FIELDS, Env, Row


# ----------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; ``right[i]`` right-aligns column i (numbers)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = list(right) if right is not None else [False] * len(headers)

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _shape(row: Row) -> str:
    s = row.shape
    if "M" in s:
        extra = ("+bias" if s.get("bias") else "") + (f"+{s['activation']}" if s.get("activation") else "")
        return f"{s['M']}x{s['N']}x{s['K']}" + (f" {extra}" if extra else "")
    if "tokens" in s:  # a packed varlen batch: B sequences, the longest Lq, tokens in all
        causal = " causal" if s.get("causal") else ""
        return f"B={s['B']} tokens={s['tokens']} max L={s['Lq']} H={s['H']} D={s['D']}{causal}"
    if "Lq" in s:
        causal = " causal" if s.get("causal") else ""
        ranks = f"P={s['P']} " if s.get("P") else ""
        window = f" window={s['window']}" if s.get("window") else ""
        return f"{ranks}B={s['B']} H={s['H']} L={s['Lq']} D={s['D']}{causal}{window}"
    return ""


def _provider(row: Row) -> str:
    return row.provider + ("*" if row.baseline else "")


def timing_table(rows: Sequence[Row]) -> str:
    """One line per (case, shape, mode), one column per provider: ``ms  TFLOP/s  speedup``.

    p20/p80 are in the CSV. A cell without a time shows the status (``oom``, ``n/a`` = unavailable,
    ``failed``); the reasons are listed under the table.
    """
    providers: list[str] = []
    lines: dict = {}
    for r in rows:
        if _provider(r) not in providers:
            providers.append(_provider(r))
        lines.setdefault((r.case, _shape(r), r.mode), {})[_provider(r)] = r
    body = []
    for (case, shape, mode), cells in lines.items():
        out = [case, shape, mode]
        for prov in providers:
            r = cells.get(prov)
            if r is None:
                out.append("")
            elif r.ms_p50 is not None:
                tf = "-" if r.tflops is None else f"{r.tflops:.1f}"
                x = "" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x"
                out.append(f"{r.ms_p50:.3f} {tf:>6} {x:>6}")
            else:
                out.append(_short_status(r.status))
        body.append(out)
    text = format_table(("case", "shape", "mode", *providers), body, [False] * 3 + [True] * len(providers))
    reasons: dict = {}
    for r in rows:
        if r.ms_p50 is None:
            reasons.setdefault((_provider(r), r.status), 0)
            reasons[(_provider(r), r.status)] += 1
    legend = "each cell: ms (median)  TFLOP/s  speedup vs the baseline (*) = baseline ms / provider ms"
    notes = [f"  {prov}: {status} ({n} cell{'s' if n > 1 else ''})" for (prov, status), n in reasons.items()]
    return "\n".join([legend, text] + (["without a time:"] + notes if notes else []))


def _short_status(status: str) -> str:
    if status.startswith("unavailable"):
        return "n/a"
    if status.startswith("skipped"):
        return "skipped"
    return status.split(":")[0]


def check_table(rows: Sequence[Row]) -> str:
    headers = ("suite", "shape", "provider", "out err", "bound", "grad err", "bound", "status")
    body = [
        (r.suite, _shape(r), _provider(r), _f(r.max_err, ".2e"), _f(r.err_bound, ".2e"), _f(r.grad_err, ".2e"),
         _f(r.grad_err_bound, ".2e"), r.status)
        for r in rows
    ]
    return format_table(headers, body, [False] * 3 + [True] * 4 + [False])


def saved_table(rows: Sequence[Row]) -> str:
    """Saved bytes with the analytic model next to them and the ratio against gradkernels."""
    gk = {}
    for r in rows:  # gradkernels' provider of each case ("gradkernels", "gradkernels-varlen", ...)
        if r.provider.startswith("gradkernels"):
            gk.setdefault((r.case, _shape(r)), r.saved_bytes)
    headers = ("case", "shape", "provider", "saved acts", "model", "saved params", "model", "acts / gradkernels",
               "status")
    body = []
    for r in rows:
        base = gk.get((r.case, _shape(r)))
        ratio = f"{r.saved_bytes / base:.2f}x" if base and r.saved_bytes is not None else "-"
        body.append((r.case, _shape(r), r.provider, fmt_bytes(r.saved_bytes), fmt_bytes(r.model_saved_bytes),
                     fmt_bytes(r.saved_param_bytes), fmt_bytes(r.model_param_bytes), ratio, r.status))
    return format_table(headers, body, [False] * 3 + [True] * 5 + [False])


def peak_table(rows: Sequence[Row]) -> str:
    gk = {}
    for r in rows:
        if r.provider.startswith("gradkernels"):
            gk.setdefault(_shape(r), r.peak_bytes)
    headers = ("shape", "provider", "peak fwd+bwd", "vs gradkernels", "status")
    body = []
    for r in rows:
        base = gk.get(_shape(r))
        ratio = f"{r.peak_bytes / base:.2f}x" if base and r.peak_bytes is not None else "-"
        body.append((_shape(r), _provider(r), fmt_bytes(r.peak_bytes), ratio, r.status))
    return format_table(headers, body, [False, False, True, True, False])


def ring_table(rows: Sequence[Row]) -> str:
    """Ring attention: bytes one rank sends per call and saves for backward, measured against the model;
    on GPUs the step time with the ring and with local copies instead (overlap = compute / ring)."""
    headers = ("shape", "layout", "what", "measured", "model", "status")
    body = []
    compute = {(_shape(r), r.provider): r.ms_p50 for r in rows if r.case == "time-compute-only"}
    for r in rows:
        if r.case == "comm":
            what, got, model = f"sent, {r.mode}", fmt_bytes(r.sent_bytes), fmt_bytes(r.model_sent_bytes)
        elif r.case == "saved":
            what, got, model = "saved for backward", fmt_bytes(r.saved_bytes), fmt_bytes(r.model_saved_bytes)
        elif r.case == "time-compute-only":
            continue
        else:
            base = compute.get((_shape(r), r.provider))
            overlap = f", overlap {base / r.ms_p50:.2f}" if base and r.ms_p50 else ""
            what = "fwd+bwd ms (compute-only ms)"
            got = _f(r.ms_p50, ".3f") + (f" ({base:.3f}{overlap})" if base else "")
            model = "-"
        body.append((_shape(r), r.provider.replace("ring-", ""), what, got, model, r.status))
    return format_table(headers, body, [False, False, False, True, True, False])


def header(env: Env) -> str:
    return f"device: {env.device}   gpu: {env.gpu}   torch {env.torch}   triton {env.triton}   {env.date}"


def render(rows: Sequence[Row], env: Env, notes: Sequence[str] = ()) -> str:
    """The whole report as text: one table per kind of measurement."""
    parts = [header(env)]
    parts += list(notes)
    groups = [
        ("Correctness against a high-precision reference (gradkernels.testing's rule: 2x torch's error for "
         "outputs, 3x for gradients, + the rounding-error bound; 'bound' = allowed where the error is largest)",
         [r for r in rows if r.mode == "check"], check_table),
        ("Linear timings",
         [r for r in rows if r.suite == "linear" and r.mode != "check"], timing_table),
        ("Attention timings",
         [r for r in rows if r.suite == "attention" and r.mode != "check"], timing_table),
        ("Varlen (packed) batches of mixed lengths: timings (TFLOP/s count the real tokens' pairs only)",
         [r for r in rows if r.suite == "varlen" and r.mode not in ("check", "saved")], timing_table),
        ("Sliding window vs full causal: timings (TFLOP/s count the window's pairs for every provider)",
         [r for r in rows if r.suite == "window" and r.mode != "check"], timing_table),
        ("Bytes saved for backward (measured with saved_tensors_hooks; model = analytic)",
         [r for r in rows if r.mode == "saved" and r.suite != "ring"], saved_table),
        ("Ring attention per rank and call: bytes sent (counted at batch_isend_irecv) and saved for backward",
         [r for r in rows if r.suite == "ring"], ring_table),
        ("Peak memory of forward+backward beyond the inputs (torch.cuda.max_memory_allocated)",
         [r for r in rows if r.suite == "memory" and r.case == "peak"], peak_table),
        ("Packed vs padded: peak memory of forward+backward beyond the inputs (torch.cuda.max_memory_allocated)",
         [r for r in rows if r.suite == "varlen" and r.case == "peak"], peak_table),
    ]
    for title, group, fn in groups:
        if group:
            parts.append(f"\n== {title}\n{fn(group)}")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def write_csv(rows: Sequence[Row], env: Env, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.as_dict(env).items()})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_plots(rows: Sequence[Row], env: Env, out_dir: str) -> tuple[list[str], str | None]:
    """PNG plots of TFLOP/s against size per provider and of memory against L.

    Returns:
        ``(paths written, message)``; the message says why plots were skipped (no matplotlib).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'gradkernels[bench]')"
    paths = []
    title = f"{env.gpu} | torch {env.torch} | triton {env.triton} | {env.date[:10]}"
    for suite in ("linear", "attention"):
        timed = [r for r in rows if r.suite == suite and r.mode in ("fwd", "bwd", "fwd+bwd")]
        if any(r.tflops for r in timed):
            paths.append(_plot_tflops(plt, suite, timed, title, out_dir))
    saved = [r for r in rows if r.mode == "saved" and r.case == "saved-attention" and r.saved_bytes]
    peak = [r for r in rows if r.case == "peak" and r.suite == "memory" and r.peak_bytes]
    if saved or peak:
        paths.append(_plot_memory(plt, saved, peak, title, out_dir))
    return paths, None


def _panel_key(r: Row):
    """Which subplot a timing row belongs to, and its x value."""
    s = r.shape
    if "Lq" in s:
        return (r.mode, f"D={s['D']}" + (" causal" if s.get("causal") else "")), s["Lq"]
    if r.case == "small_m":
        return (r.mode, f"small M, N=K={s['N']}"), s["M"]
    return (r.mode, r.case), s["M"]


def _plot_tflops(plt, suite, rows, title, out_dir):
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.tflops:
            key, x = _panel_key(r)
            panels[key][_provider(r)].append((x, r.tflops))
    colors = _colors(rows)
    keys = sorted(panels, key=lambda k: (("fwd", "bwd", "fwd+bwd").index(k[0]), k[1]))
    cols = len({k[1] for k in keys})
    nrows = len({k[0] for k in keys})
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    col_of = {name: i for i, name in enumerate(sorted({k[1] for k in keys}))}
    row_of = {m: i for i, m in enumerate(m for m in ("fwd", "bwd", "fwd+bwd") if any(k[0] == m for k in keys))}
    for key in keys:
        ax = axes[row_of[key[0]]][col_of[key[1]]]
        for prov, pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=colors[prov])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[0]}  {key[1]}", fontsize=9)
        ax.set_xlabel("L" if suite == "attention" else "M")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{suite}\n{title}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{suite}_tflops.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colors(rows):
    """One colour per provider across every panel (a provider missing from a panel shifts nothing)."""
    names = list(dict.fromkeys(_provider(r) for r in rows))
    return {n: f"C{i % 10}" for i, n in enumerate(names)}


def _plot_memory(plt, saved, peak, title, out_dir):
    from matplotlib.ticker import FuncFormatter

    colors = _colors(list(saved) + list(peak))
    panels = [(saved, "saved for backward (bytes)", "saved_bytes"), (peak, "peak fwd+bwd (bytes)", "peak_bytes")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (rows, label, attr) in zip(axes[0], panels):
        by = defaultdict(list)
        for r in rows:
            by[_provider(r)].append((r.shape["Lq"], getattr(r, attr)))
        for prov, pts in sorted(by.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=colors[prov])
        r0 = rows[0]
        ax.set_title(f"{label}\nB={r0.shape['B']} H={r0.shape['H']} D={r0.shape['D']} {r0.dtype}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("L")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(int(v))))
        ax.set_ylabel("bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"attention memory\n{title}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
