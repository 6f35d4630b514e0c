"""``python -m gradkernels.aot [check|compare-real|tiles|perf] ...``: the AOT report's command line.

- ``check`` (the default when no subcommand is given): compile, print the table and the summary; exit 1
  when a config the autotuner can pick fails, 2 on bad arguments. ``--autotune-log LOG`` also checks the
  configs an autotuner picked (``TRITON_PRINT_AUTOTUNING=1`` output) against the report.
- ``compare-real`` (CUDA only): compile for this GPU's architecture, then launch each row for real and
  compare registers, spills and shared memory with the AOT numbers.
- ``tiles``: write the attention tile table from ``check --include-pruned --json`` reports.
- ``perf``: the static performance report (:mod:`.perf`): per kept config of the performance catalogue,
  registers, spills, shared memory and the main loop's SASS (instructions per element, tensor-core
  shapes, ...); ``--compare REPORT`` exits 1 when a row got worse than the committed report.

A new report is one more entry in :data:`COMMANDS`: a help line, a function adding its arguments to an
``argparse`` parser, and one running it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, NamedTuple, Sequence

import torch

from .. import _device
from ..kernels.arch import ARCHS
from .check import build_rows, compile_rows, failing
from .compiler import versions
from .perf import build_perf_rows, compile_perf_rows, format_perf_table, regressions, report, write_json
from .real import check_picks, compare_real, parse_autotune_log
from .report import format_table, rows_to_json, summary
from .targets import DEFAULT_ARCHS, DTYPES
from .tiles import attention_tile_table, write_attention_tiles


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_filters(p: argparse.ArgumentParser, default_arch: str = ",".join(map(str, DEFAULT_ARCHS))) -> None:
    """The arguments that select rows: architectures, kernels, dtypes, cases, compile processes."""
    p.add_argument("--arch", default=default_arch,
                   help=f"compute capabilities, comma separated (default {default_arch}; 'native' = this GPU)")
    p.add_argument("--kernel", default="", help="only kernels/families whose name contains one of these (comma list)")
    p.add_argument("--dtype", default="", help=f"comma list of {', '.join(DTYPES)} (default all)")
    p.add_argument("--case", default="", help="only cases whose name contains one of these (comma list)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: all usable CPUs)")


def parse_filters(args, p: argparse.ArgumentParser) -> dict:
    """Validated :func:`add_filters` arguments as keyword arguments of :func:`.check.build_rows`
    (``archs``, ``kernels``, ``dtypes``, ``cases``); exits with status 2 on a bad value."""
    if args.arch == "native":
        if _device.cuda_capability() is None:
            p.error("--arch native needs a CUDA device")
        archs = [_device.device_arch(torch.device("cuda", torch.cuda.current_device()))]
    else:
        try:
            archs = [int(a) for a in _csv(args.arch)]
        except ValueError:
            p.error(f"--arch must be comma-separated integers such as 80,90, got {args.arch!r}")
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        p.error(f"--arch: unsupported {bad}; choose from {sorted(ARCHS)}")
    dtypes = _csv(args.dtype) or None
    for d in dtypes or ():
        if d not in DTYPES:
            p.error(f"--dtype: {d!r} is not one of {', '.join(DTYPES)}")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")
    return {"archs": archs, "kernels": _csv(args.kernel) or None, "dtypes": dtypes, "cases": _csv(args.case) or None}


def _progress(t0):
    def progress(done, total):
        if sys.stderr.isatty():
            print(f"\rcompiled {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % 50 == 0:
            print(f"compiled {done}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    return progress


def _compile(rows, jobs, t0):
    compile_rows(rows, jobs, _progress(t0))


def _built_rows(args, p, **kw):
    """The architectures and rows the filters select, after printing the header; no rows (after a
    message) when nothing matches."""
    filters = parse_filters(args, p)
    print(f"gradkernels AOT report: sm_{', sm_'.join(map(str, filters['archs']))}; {versions()}", flush=True)
    rows = build_rows(**filters, **kw)
    if not rows:
        print("no kernel launch matches the filters", file=sys.stderr)
    return filters["archs"], rows


def _print_failing(rows, elapsed):
    print("\n" + summary(rows, elapsed))
    for r in failing(rows):
        print(f"FAIL sm_{r.arch} {r.kernel} {r.case} {r.dtype} {r.config}: {'; '.join(r.failures)}")
    for r in rows:
        if not r.pruned and r.known:
            print(f"KNOWN sm_{r.arch} {r.kernel} {r.case} {r.dtype} {r.config}: {'; '.join(r.known)} "
                  f"(attention_configs.NO_CLEAN_TILE_UNDER)")


# ----------------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------------


def _check_arguments(p: argparse.ArgumentParser) -> None:
    add_filters(p)
    p.add_argument("--include-pruned", action="store_true",
                   help="also compile configs that the prune drops (not the ones certain to spill)")
    p.add_argument("--all-pruned", action="store_true",
                   help="with --include-pruned: the ones certain to spill too (hours for attention)")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="what-if: compile every tuned config with this maxnreg (PTX .maxnreg), e.g. 255")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--failures-only", action="store_true", help="print only failing rows")
    p.add_argument("--autotune-log", default=None,
                   help="a log with TRITON_PRINT_AUTOTUNING=1 output: check the picked configs against the report")


def _check(args, p: argparse.ArgumentParser) -> int:
    t0 = time.perf_counter()
    archs, rows = _built_rows(args, p, include_pruned=args.include_pruned, maxnreg=args.maxnreg,
                              all_pruned=args.all_pruned)
    if not rows:
        return 2
    _compile(rows, args.jobs, t0)
    elapsed = time.perf_counter() - t0
    print(format_table(failing(rows) if args.failures_only else rows))
    status = 1 if failing(rows) else 0
    if args.autotune_log:
        with open(args.autotune_log, encoding="utf-8", errors="replace") as f:
            checked = check_picks(parse_autotune_log(f.read()), rows)
        print(f"\nAutotuner picks in {args.autotune_log}: {len(checked)}")
        for pick, verdict in dict(((p["kernel"], p["dtype"], p["config"]), (p, v)) for p, v in checked).values():
            print(f"  {pick['kernel']} {pick['dtype']} {pick['config']}: {verdict}")
        if any(v.startswith("FAIL") for _, v in checked):
            status = 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"versions": versions(), "archs": archs, "rows": rows_to_json(rows)}, f, indent=1)
    _print_failing(rows, elapsed)
    return status


# ----------------------------------------------------------------------------------------------------
# compare-real
# ----------------------------------------------------------------------------------------------------


def _compare_real_arguments(p: argparse.ArgumentParser) -> None:
    add_filters(p, default_arch="native")


def _compare_real(args, p: argparse.ArgumentParser) -> int:
    t0 = time.perf_counter()
    _, rows = _built_rows(args, p)
    if not rows:
        return 2
    _compile(rows, args.jobs, t0)
    status = 1 if failing(rows) else 0
    print("\nAOT vs real launch (this GPU):")
    compared = compare_real(rows)
    for r, real, verdict in compared:
        print(f"  sm_{r.arch} {r.kernel} {r.case} {r.dtype} {r.config}: real regs {real.get('regs')} "
              f"local {real.get('local_bytes')} B smem {real.get('shared')} -> {verdict}")
    if any(not v.startswith("same") for _, _, v in compared):
        status = 1
    _print_failing(rows, time.perf_counter() - t0)
    return status


# ----------------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------------


def _tiles_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="reports", required=True,
                   help="comma list of `check --include-pruned --json` reports")
    p.add_argument("--write", required=True, help="the module to write (kernels/attention_tiles.py)")


def _tiles(args, p: argparse.ArgumentParser) -> int:
    rows, sources = [], []
    for name in _csv(args.reports):
        with open(name, encoding="utf-8") as f:
            report = json.load(f)
        rows += report["rows"]
        sources.append(report.get("versions", "?"))
    table = attention_tile_table(rows)
    write_attention_tiles(table, args.write, f"{len(rows)} report rows; {'; '.join(sorted(set(sources)))}")
    print(f"wrote {args.write}")
    return 0


# ----------------------------------------------------------------------------------------------------
# perf
# ----------------------------------------------------------------------------------------------------


def _perf_arguments(p: argparse.ArgumentParser) -> None:
    add_filters(p)
    p.add_argument("--json", default=None, help="write the report (rows and model constants) as JSON to this file")
    p.add_argument("--table", default=None, help="also write the table to this file")
    p.add_argument("--config", default="",
                   help="only configs whose label contains one of these (comma list, e.g. '128x64 w8 s3'); "
                        "'picked' is then chosen among them")
    p.add_argument("--picked-only", action="store_true", help="print only the rows of the picked configs")
    p.add_argument("--compare", default=None,
                   help="a committed report (JSON) of the same Triton: exit 1 when a row got worse than it "
                        "(instructions per element, registers, spills)")
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # development aid, see compile_perf_rows


def _perf(args, p: argparse.ArgumentParser) -> int:
    t0 = time.perf_counter()
    filters = parse_filters(args, p)
    print(f"gradkernels static performance report: sm_{', sm_'.join(map(str, filters['archs']))}; {versions()}",
          flush=True)
    rows = build_perf_rows(**filters, configs=_csv(args.config) or None)
    if not rows:
        print("no kernel launch matches the filters", file=sys.stderr)
        return 2
    progress = _progress(t0)
    compile_perf_rows(rows, args.jobs, progress, cache=args.cache)
    data = report(rows, filters["archs"])
    table = format_perf_table(data["rows"], picked_only=args.picked_only)
    print(table)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(f"# {data['versions']}\n" + format_perf_table(data["rows"]) + "\n")
    if args.json:
        write_json(data, args.json)
    failed = [r for r in data["rows"] if r["failures"]]
    print(f"\n{len(data['rows'])} rows ({len({r.check_row.job for r in rows})} distinct compiles), "
          f"{sum(r['picked'] for r in data['rows'])} picked, {len(failed)} failing the check, "
          f"{time.perf_counter() - t0:.0f} s")
    status = 0
    if args.compare:
        with open(args.compare, encoding="utf-8") as f:
            recorded = json.load(f)
        if recorded.get("triton") != data["triton"]:
            print(f"--compare: {args.compare} is for Triton {recorded.get('triton')}, this is {data['triton']}",
                  file=sys.stderr)
            return 2
        worse, compared = regressions(data["rows"], recorded["rows"])
        print(f"compared {compared} rows with {args.compare}: {len(worse)} regressions")
        for line in worse:
            print(f"REGRESSION {line}")
        status = 1 if worse else 0
    return status


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


COMMANDS: dict[str, Command] = {
    "check": Command("compile every pickable config for sm_80/sm_90 and judge it (the default)",
                     _check_arguments, _check),
    "compare-real": Command("CUDA only: launch the rows for real and compare with the AOT numbers",
                            _compare_real_arguments, _compare_real),
    "tiles": Command("write the attention tile table from --include-pruned JSON reports",
                     _tiles_arguments, _tiles),
    "perf": Command("the static performance report: main-loop SASS of every kept config (bench/GPU.md)",
                    _perf_arguments, _perf),
}
DEFAULT_COMMAND = "check"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand (``check`` when the arguments name none); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_COMMAND)
    parser = argparse.ArgumentParser(prog="python -m gradkernels.aot",
                                     description="Ahead-of-time compile report of the gradkernels kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {}
    for name, cmd in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(parsers[name])
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args, parsers[args.command])
