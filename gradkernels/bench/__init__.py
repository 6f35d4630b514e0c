"""Microbenchmarks and memory comparison: ``python -m gradkernels.bench [linear|attention|memory|features|all]``.

On a CUDA machine: timings of every provider (gradkernels, torch/cuBLAS/SDPA backends, the naive
reference paths) in forward, backward and forward+backward, peak memory against sequence length, the
saved-for-backward comparison, and a correctness check of each kernel against fp64.

Without a GPU: the correctness check of each kernel under Triton's interpreter and the
saved-for-backward comparison (both honest work on a CPU), and a plain statement that timings need a
GPU. Interpreter timings are never taken: they would measure numpy, not a kernel.

See ``bench/README.md`` for every option and column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

__all__ = ["main"]

SUITES = ("linear", "attention", "memory", "features", "ring", "all")  # "all" = the first four (ring starts processes)


def _ints(text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _shapes(text: str) -> tuple:
    shapes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", item)
        if not m or min(int(g) for g in m.groups()) < 1:
            raise argparse.ArgumentTypeError(f"--shapes expects MxNxK[,MxNxK...] with positive sizes, got {item!r}")
        shapes.append(tuple(int(g) for g in m.groups()))
    return tuple(shapes)


def _modes(text: str) -> tuple:
    from .flops import MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--modes expects a comma-separated subset of {MODES}, got {text!r}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    from ..reference import ACTIVATIONS
    from .harness import DTYPES

    p = argparse.ArgumentParser(
        prog="gradkernels-bench",
        description="Benchmarks of gradkernels against torch and the naive reference paths "
        "(timings need a CUDA GPU; without one, correctness and saved-memory checks run).",
    )
    p.add_argument("suite", nargs="?", default="all", choices=SUITES, help="what to run (default: all)")
    p.add_argument("--quick", action="store_true", help="a short sweep (a couple of minutes on an H100)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of every case (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--modes", type=_modes, default=None, help="subset of fwd,bwd,fwd+bwd (default: all three)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to time (default: all); baselines are always kept")
    g = p.add_argument_group("linear sizes")
    g.add_argument("--shapes", type=_shapes, default=None, help="MxNxK[,MxNxK...] instead of the standard groups")
    g.add_argument("--bias", action="store_true", help="with --shapes: add a bias")
    g.add_argument("--activation", default=None, choices=[a for a in ACTIVATIONS if a is not None],
                   help="with --shapes: fuse this activation")
    g = p.add_argument_group("attention sizes")
    g.add_argument("--seqlens", type=_ints, default=None, help="L values (default 1024..16384; quick: 1024,4096)")
    g.add_argument("--head-dims", type=_ints, default=None, help="D values (default 64,128)")
    g.add_argument("--batch", type=int, default=None, help="B (default 16384 / L)")
    g.add_argument("--heads", type=int, default=None, help="H (default 2048 / D)")
    g.add_argument("--causal", nargs="?", const="yes", default="both", choices=["yes", "no", "both"],
                   help="--causal: causal only; --causal no: non-causal only (default: both)")
    g = p.add_argument_group("ring (context-parallel attention; not part of 'all')")
    g.add_argument("--world", type=_ints, default=None,
                   help="process counts P (default 2 on a CPU, quick too; on GPUs 2, 4, 8 up to the GPU count)")
    g.add_argument("--shard-lens", type=_ints, default=None,
                   help="positions per rank (L = P * shard; default CPU 16 (quick) or 16,48; GPU 4096(,16384))")
    g = p.add_argument_group("memory")
    g.add_argument("--max-len", type=int, default=None,
                   help="largest L of the peak-memory sweep (doubling from 512; default 32768, quick 4096)")
    g = p.add_argument_group("timing and output")
    g.add_argument("--warmup", type=int, default=None, help="do_bench warm-up in ms (default 25, quick 10)")
    g.add_argument("--rep", type=int, default=None, help="do_bench measuring time in ms (default 100, quick 40)")
    g.add_argument("--out", default=os.path.join("bench", "results", "latest"),
                   help="output directory; {gpu} and {date} are filled in (default bench/results/latest)")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    return p


def _needs_interpreter() -> bool:
    """No GPU, Triton present, interpreter not on: the kernels could not run in this process."""
    import torch

    from .._device import interpreter_enabled, triton_available

    return not torch.cuda.is_available() and triton_available() and not interpreter_enabled()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def main(argv=None) -> int:
    """Run the benchmarks; see ``--help``.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 1 when a gradkernels kernel failed its correctness check or a saved-bytes
        measurement disagreed with its model; 2 on bad arguments. Providers that are unavailable, fail
        or run out of memory are reported in the results and do not change the exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)

    if _needs_interpreter():
        # TRITON_INTERPRET is read when the kernels are decorated, i.e. when gradkernels is imported:
        # too late for this process. Run again in a child that has it from the start.
        print("no CUDA GPU: re-running with TRITON_INTERPRET=1 so the kernels run under Triton's interpreter",
              file=sys.stderr, flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "gradkernels.bench", *argv], env=env)

    args.argv = argv
    return _run(args, parser)


def _run(args, parser) -> int:
    from .harness import Env

    env = Env.detect()
    if args.suite == "ring":
        return _run_ring(args, env)
    wanted = _wanted_providers(args, parser)
    if wanted is False:
        return 2
    plan = _plan(args, env, wanted)
    plan.no_progress = args.no_progress
    return _write(args, env, _execute(plan), plan.notes)


def _wanted_providers(args, parser):
    """The providers ``--providers`` names, with every baseline (None: all); False after a usage error."""
    from . import attention, features, linear

    registries = (linear.REGISTRY, attention.REGISTRY, features.VARLEN, features.WINDOW)
    if not args.providers:
        return None
    wanted = {n.strip() for n in args.providers.split(",") if n.strip()}
    known = {p.name for r in registries for p in r.providers}
    unknown = sorted(wanted - known)
    if unknown:
        parser.print_usage(sys.stderr)
        print(f"gradkernels-bench: error: --providers: unknown {unknown}; known: {sorted(known)}", file=sys.stderr)
        return False
    return wanted | {r.baseline.name for r in registries}


class _Plan:
    """What one run does: (kind, suite, cases, providers) steps, the memory sweeps, notes for the report."""

    def __init__(self, env, dtype, modes, opts):
        self.env, self.dtype, self.modes, self.opts = env, dtype, modes, opts
        self.device = "cuda" if env.on_gpu else "cpu"
        self.steps, self.notes = [], []
        self.memory = None  # (saved sweep, peak lengths, peak providers) when the memory suite runs
        self.features_memory = None  # (saved cases, peak cases) when the features suite runs
        self.no_progress = False

    def total(self) -> int:
        from . import memory

        n = sum(len(cases) * len(provs) * (len(self.modes) if kind == "time" else 1)
                for kind, _, cases, provs in self.steps)
        if self.memory is not None:
            sweep, lens, peak_provs = self.memory
            n += len(sweep.attention_lens) * len(memory.SAVED_ATTENTION_PROVIDERS)
            n += 3 * len(sweep.linear_ms) * len(memory.SAVED_LINEAR_PROVIDERS)
            n += len(lens) * len(peak_provs) if self.env.on_gpu else 0
        if self.features_memory is not None:
            from . import features

            n += sum(len(c) for c in self.features_memory) * len(features.VARLEN.providers)
        return n


def _plan(args, env, wanted) -> _Plan:
    import torch

    from . import attention, features, linear, memory
    from .harness import DTYPES, TimingOptions

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if env.on_gpu else torch.float32)
    opts = TimingOptions(args.warmup or (10 if args.quick else 25), args.rep or (40 if args.quick else 100))
    plan = _Plan(env, dtype, args.modes or ("fwd", "bwd", "fwd+bwd"), opts)
    causal = {"yes": (True,), "no": (False,), "both": (False, True)}[args.causal]
    suites = ("linear", "attention", "memory", "features") if args.suite == "all" else (args.suite,)
    if not env.on_gpu:
        plan.notes.append(
            "No CUDA GPU on this machine: timings need a GPU, and none were taken (under Triton's interpreter a\n"
            "time would measure numpy, not a kernel). What ran here: the correctness check of each kernel\n"
            "under the interpreter and the saved-for-backward comparison."
        )
        if dtype == torch.bfloat16:
            plan.notes.append("bf16: Triton's interpreter cannot do bf16 arithmetic; the kernels are reported "
                              "unavailable.")
    if "linear" in suites:
        plan.steps.append(("check", "linear", linear.check_cases(dtype, env.on_gpu), linear.REGISTRY.providers))
        if env.on_gpu:
            cases = linear.timing_cases(dtype, args.quick, args.shapes, args.bias, args.activation)
            plan.steps.append(("time", "linear", cases, linear.REGISTRY.select(wanted)))
    if "attention" in suites:
        cases = attention.timing_cases(dtype, args.quick, args.seqlens, args.head_dims, causal, args.batch,
                                       args.heads)
        head_dims = sorted({c.D for c in cases})
        plan.steps.append(("check", "attention", attention.check_cases(dtype, env.on_gpu, head_dims, causal),
                           attention.REGISTRY.providers))
        if env.on_gpu:
            plan.steps.append(("time", "attention", cases, attention.REGISTRY.select(wanted)))
    if "memory" in suites:
        plan.memory = (memory.saved_sweep(env.on_gpu, args.quick), memory.peak_lens(args.quick, args.max_len),
                       attention.REGISTRY.select(wanted))
        if not env.on_gpu:
            plan.notes.append("Peak memory (torch.cuda.max_memory_allocated) needs a GPU: not measured here.")
    if "features" in suites:
        head_dims = args.head_dims
        plan.steps.append(("check", "varlen", features.varlen_check_cases(dtype, env.on_gpu, causal),
                           features.VARLEN.providers))
        plan.steps.append(("check", "window", features.window_check_cases(dtype, env.on_gpu),
                           [p for p in features.WINDOW.providers if p.name in ("gradkernels-window",
                                                                               "sdpa-window-mask")]))
        if env.on_gpu:
            plan.steps.append(("time", "varlen", features.varlen_timing_cases(dtype, args.quick, causal, head_dims),
                               features.VARLEN.select(wanted)))
            plan.steps.append(("time", "window", features.window_timing_cases(dtype, args.quick, head_dims),
                               features.WINDOW.select(wanted)))
        saved = features.saved_cases(dtype, env.on_gpu)
        plan.features_memory = (saved, saved if env.on_gpu else [])
    return plan


def _execute(plan: _Plan) -> list:
    from . import memory
    from .harness import Progress, run_check, run_timing

    progress = Progress(plan.total(), enabled=not plan.no_progress)
    rows = []
    for kind, suite, cases, provs in plan.steps:
        if kind == "check":
            oracles = {"linear": ("torch",), "varlen": ("sdpa-padded",), "window": ("sdpa-window-mask",)}.get(
                suite, ("sdpa-flash", "sdpa-math"))
            rows += run_check(suite, cases, provs, plan.device, progress, oracle_names=oracles)
        else:
            rows += run_timing(suite, cases, provs, plan.modes, plan.device, plan.opts, progress)
    if plan.memory is not None:
        sweep, lens, peak_provs = plan.memory
        rows += memory.run_saved(plan.device, plan.dtype, sweep, progress)
        if plan.env.on_gpu:
            rows += memory.run_peak(plan.device, plan.dtype, lens, providers=peak_provs, progress=progress)
    if plan.features_memory is not None:
        from . import features

        saved, peak = plan.features_memory
        rows += features.run_saved(saved, plan.device, progress)
        if peak:
            rows += features.run_peak(peak, plan.device, progress)
    progress.close()
    return rows


def _run_ring(args, env) -> int:
    import torch

    from . import ring
    from .harness import DTYPES, Progress

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if env.on_gpu else torch.float32)
    worlds = args.world
    if worlds is None and env.on_gpu:
        worlds = tuple(p for p in (2, 4, 8) if p <= torch.cuda.device_count()) or (2,)
    elif worlds is None:
        worlds = (2,)
    causal = {"yes": (True,), "no": (False,), "both": (False, True)}[args.causal]
    cases = ring.cases(env.on_gpu, args.quick, dtype, worlds, args.shard_lens, causal, args.heads,
                       args.head_dims, args.batch)
    notes = []
    if not env.on_gpu:
        notes.append(
            "No CUDA GPU: the ring runs in P processes with gloo and the kernels under Triton's interpreter;\n"
            "bytes sent and saved are measured, times are not (they would measure numpy and gloo on a CPU)."
        )
    progress = Progress(len(cases), enabled=not args.no_progress)
    rows = ring.run(cases, "cuda" if env.on_gpu else "cpu", rep_ms=args.rep or (40 if args.quick else 100),
                    progress=progress)
    progress.close()
    return _write(args, env, rows, notes)


def _write(args, env, rows, notes) -> int:
    import torch

    from . import report
    from .harness import DTYPES

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if env.on_gpu else torch.float32)
    text = report.render(rows, env, notes)
    print(text, end="")

    out_dir = args.out.format(gpu=_slug(env.gpu if env.on_gpu else "cpu"), date=env.date[:10])
    os.makedirs(out_dir, exist_ok=True)
    report.write_csv(rows, env, os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        meta = {"argv": args.argv, "suite": args.suite, "quick": args.quick, "dtype": str(dtype),
                **{k: getattr(env, k) for k in ("device", "gpu", "torch", "triton", "date")}}
        json.dump(meta, f, indent=2)
    written = [os.path.join(out_dir, n) for n in ("results.csv", "table.txt", "meta.json")]
    if not args.no_plots:
        paths, message = report.write_plots(rows, env, out_dir)
        written += paths
        if message:
            print(message)
    print("wrote " + ", ".join(written))

    bad = [r for r in rows if r.status.startswith("failed") and (r.mode == "saved" or r.suite == "ring" or (
        r.mode == "check" and r.provider.startswith("gradkernels")))]
    if bad:
        print(f"{len(bad)} check(s) failed: " + "; ".join(f"{r.suite}/{r.provider} {r.status}" for r in bad),
              file=sys.stderr)
        return 1
    return 0
