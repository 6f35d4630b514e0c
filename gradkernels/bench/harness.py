"""The one benchmark harness: providers, cases, modes, timing, correctness checks, result rows.

Shape of it (tritonbench / Liger's benchmark utilities, rewritten small):

- A suite (``linear``, ``attention``) registers *providers* on a :class:`Registry`, one flagged
  ``baseline=True``; a provider is a function ``(case, inputs) -> output`` that runs the forward.
- A *case* (a dataclass of the suite) knows its shape fields, its FLOPs per mode, how to make inputs
  and its reference (``oracle()``: high-precision reference and rounding-error bounds).
- :func:`run_timing` times every provider on every case in the modes ``fwd``, ``bwd``, ``fwd+bwd`` with
  CUDA events through ``triton.testing.do_bench`` (median with 20th/80th percentiles; do_bench zeroes
  a 256 MB buffer before every repetition, so inputs never sit in L2 across repetitions).
- :func:`run_check` compares every provider against a high-precision reference; the gradkernels
  providers must pass :mod:`gradkernels.testing`'s rule, the test suite's: within 2x (outputs) / 3x
  (gradients) of torch's own error in the same dtype plus the operation's rounding-error bound (a case's
  ``oracle()`` gives reference and bounds; fp64 references in extended precision).
- Nothing a provider does takes the run down: unavailable -> ``unavailable: why``, an exception ->
  ``failed: why``, CUDA out of memory -> ``oom``. Every outcome is a :class:`Row`.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import testing
from .flops import MODES, tflops

QUANTILES = (0.5, 0.2, 0.8)

# Columns of every result row, in CSV order. Shape fields are blank where they do not apply.
SHAPE_FIELDS = ("B", "H", "Lq", "Lk", "D", "M", "N", "K", "bias", "activation", "causal", "P", "window", "tokens")
RESULT_FIELDS = (
    "ms_p50", "ms_p20", "ms_p80", "tflops", "speedup_vs_baseline",
    "max_err", "err_bound", "grad_err", "grad_err_bound",
    "peak_bytes", "saved_bytes", "model_saved_bytes", "saved_param_bytes", "model_param_bytes",
    "sent_bytes", "model_sent_bytes",
)
ENV_FIELDS = ("device", "gpu", "torch", "triton", "date")
CSV_FIELDS = ("suite", "case", "provider", "baseline", "mode", "dtype", *SHAPE_FIELDS, *RESULT_FIELDS,
              "status", *ENV_FIELDS)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class Unavailable(Exception):
    """Raised by a provider that cannot run this case on this machine (not a failure)."""


# ----------------------------------------------------------------------------------------------------
# Rows and environment
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement (or one reason there is none). ``shape`` holds the :data:`SHAPE_FIELDS` used."""

    suite: str
    case: str
    provider: str
    baseline: bool
    mode: str
    dtype: str
    shape: dict = field(default_factory=dict)
    ms_p50: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    speedup_vs_baseline: float | None = None
    max_err: float | None = None
    err_bound: float | None = None
    grad_err: float | None = None
    grad_err_bound: float | None = None
    peak_bytes: int | None = None
    saved_bytes: int | None = None
    model_saved_bytes: int | None = None
    saved_param_bytes: int | None = None
    model_param_bytes: int | None = None
    sent_bytes: int | None = None  # ring suite: bytes one rank sends per call (all exchanges)
    model_sent_bytes: int | None = None
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok" or self.status.startswith("ok ")

    def as_dict(self, env: "Env") -> dict:
        d = {k: getattr(self, k) for k in ("suite", "case", "provider", "baseline", "mode", "dtype")}
        d.update({k: self.shape.get(k) for k in SHAPE_FIELDS})
        d.update({k: getattr(self, k) for k in RESULT_FIELDS})
        d["status"] = self.status
        d.update(dataclasses.asdict(env))
        return d


@dataclass(frozen=True)
class Env:
    """What a result is keyed by: the device, the GPU's name, the versions and the date."""

    device: str
    gpu: str
    torch: str
    triton: str
    date: str

    @staticmethod
    def detect() -> "Env":
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # pragma: no cover - triton is a dependency on Linux
            triton_version = "none"
        if torch.cuda.is_available():
            device, gpu = "cuda", torch.cuda.get_device_name()
        else:
            interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
            device = "cpu (Triton interpreter)" if interp else "cpu"
            gpu = f"none ({platform.processor() or platform.machine()})"
        now = datetime.datetime.now(datetime.timezone.utc)
        return Env(device=device, gpu=gpu, torch=torch.__version__, triton=triton_version,
                   date=now.strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


# ----------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """A way to compute a suite's forward: ``fn(case, inputs) -> output``."""

    name: str
    fn: Callable[[Any, dict], torch.Tensor]
    baseline: bool = False
    kernel: bool = False  # a gradkernels kernel: checked against the bound, not just reported
    description: str = ""


class Registry:
    """The providers of one suite, in registration order (the table's order)."""

    def __init__(self, suite: str):
        self.suite = suite
        self.providers: list[Provider] = []

    def register(self, name: str, *, baseline: bool = False, kernel: bool = False, description: str = ""):
        """Decorator: register ``fn(case, inputs) -> output`` as provider ``name``."""

        def deco(fn):
            if any(p.name == name for p in self.providers):
                raise ValueError(f"provider {name!r} is already registered in suite {self.suite!r}")
            self.providers.append(Provider(name, fn, baseline, kernel, description or (fn.__doc__ or "")))
            return fn

        return deco

    @property
    def baseline(self) -> Provider:
        return next(p for p in self.providers if p.baseline)

    def select(self, names: Iterable[str] | None) -> list[Provider]:
        """The providers named (all when ``names`` is None), in registration order."""
        if names is None:
            return list(self.providers)
        names = set(names)
        return [p for p in self.providers if p.name in names]


def describe_error(exc: BaseException) -> str:
    """``oom``, ``unavailable: why`` or ``failed: Type: first line`` for a provider's exception."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    first = (str(exc).strip().splitlines() or [""])[0]
    if len(first) > 160:
        first = first[:157] + "..."
    if isinstance(exc, Unavailable):
        return f"unavailable: {first}"
    return f"failed: {type(exc).__name__}: {first}"


def release_memory() -> None:
    """Return cached blocks after an OOM or a big provider, so the next one starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def _grad_leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


# ----------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------


class Progress:
    """``[ 12/288] label`` on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = total, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = len(str(self.total))
        line = f"[{self.done:>{width}}/{self.total}] {label}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingOptions:
    warmup_ms: int = 25
    rep_ms: int = 100


def mode_runner(forward: Callable[[], torch.Tensor], mode: str) -> Callable[[], Any]:
    """A callable that does the work of ``mode``.

    ``fwd`` runs the forward with autograd recording (a training forward: it saves what backward needs).
    ``bwd`` runs one forward now, then times ``backward`` of that graph (``retain_graph`` so it can
    repeat). ``fwd+bwd`` times both together.
    """
    if mode == "fwd":
        return forward
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = forward()
    dout = torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(dout, retain_graph=True)
    return lambda: forward().backward(dout)


def time_ms(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor], opts: TimingOptions):
    """(p50, p20, p80) in milliseconds, CUDA events through ``triton.testing.do_bench``."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(
        fn, warmup=opts.warmup_ms, rep=opts.rep_ms, grad_to_none=list(grad_to_none), quantiles=list(QUANTILES)
    )
    return float(p50), float(p20), float(p80)


def _row(suite, case, provider: Provider, mode, **kw) -> Row:
    return Row(suite=suite, case=case.group, provider=provider.name, baseline=provider.baseline, mode=mode,
               dtype=DTYPE_NAMES[case.dtype], shape=case.fields(), **kw)


def run_timing(suite: str, cases: Sequence[Any], providers: Sequence[Provider], modes: Sequence[str],
               device: str, opts: TimingOptions, progress: Progress | None = None) -> list[Row]:
    """Time each provider on each case in each mode, one process, inputs shared across providers.

    Returns one :class:`Row` per (case, provider, mode); speedups are against the baseline provider of
    the same case and mode (blank when the baseline has no time).
    """
    rows: list[Row] = []
    for case in cases:
        case_rows: list[Row] = []
        try:
            inputs = case.make_inputs(device)
        except Exception as exc:  # the inputs alone do not fit: every provider is out
            status = describe_error(exc)
            for p in providers:
                for mode in modes:
                    case_rows.append(_row(suite, case, p, mode, status=status))
                    if progress:
                        progress.step(f"{suite} {case.label()} {mode} {p.name}: {status}")
            rows.extend(case_rows)
            release_memory()
            continue
        for p in providers:
            status = None
            try:
                out = p.fn(case, inputs)  # smoke run: availability, compilation, autotuning
                out.sum().item()
                del out
            except Exception as exc:
                status = describe_error(exc)
            for mode in modes:
                row = _row(suite, case, p, mode)
                if status is not None:
                    row.status = status
                else:
                    try:
                        row.ms_p50, row.ms_p20, row.ms_p80 = _time_mode(p, case, inputs, mode, opts)
                        row.tflops = tflops(case.flops(mode), row.ms_p50)
                    except Exception as exc:
                        row.status = describe_error(exc)
                clear_grads(inputs)
                if row.status == "oom":
                    release_memory()
                case_rows.append(row)
                if progress:
                    shown = f"{row.ms_p50:.3f} ms" if row.ms_p50 is not None else row.status
                    progress.step(f"{suite} {case.label()} {mode} {p.name}: {shown}")
        del inputs
        release_memory()
        _fill_speedups(case_rows)
        rows.extend(case_rows)
    return rows


def _time_mode(p: Provider, case, inputs: dict, mode: str, opts: TimingOptions):
    # A function of its own so the recorded graph (``bwd`` keeps one) dies with this frame.
    run = mode_runner(lambda: p.fn(case, inputs), mode)
    return time_ms(run, _grad_leaves(inputs), opts)


def _fill_speedups(case_rows: list[Row]) -> None:
    base = {r.mode: r.ms_p50 for r in case_rows if r.baseline and r.ms_p50}
    for r in case_rows:
        if r.ms_p50 and base.get(r.mode):
            r.speedup_vs_baseline = base[r.mode] / r.ms_p50


# ----------------------------------------------------------------------------------------------------
# Correctness: gradkernels.testing's rule
# ----------------------------------------------------------------------------------------------------


def _forward_backward(fn: Callable[[], torch.Tensor], inputs: dict, dout: torch.Tensor):
    clear_grads(inputs)
    out = fn()
    out.backward(dout.to(out.dtype))
    grads = {k: t.grad.detach().clone() for k, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    clear_grads(inputs)
    return out.detach(), grads


def _oracle(case, inputs: dict, dout: torch.Tensor):
    """(reference output, reference gradients, floors or None): the case's ``oracle()`` (high-precision
    reference and rounding-error bounds) where it has one, else its fp64 ``reference()`` through autograd
    (checked with the magnitude floor)."""
    if hasattr(case, "oracle"):
        return case.oracle(inputs, dout)
    ref_inputs = {k: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
                  for k, t in inputs.items()}
    out, grads = _forward_backward(lambda: case.reference(ref_inputs), ref_inputs, dout.double())
    return out, grads, None


def run_check(suite: str, cases: Sequence[Any], providers: Sequence[Provider], device: str,
              progress: Progress | None = None, oracle_names: Sequence[str] = ()) -> list[Row]:
    """Forward and gradients of every provider against the case's reference.

    The "torch in the same dtype" oracle is the first of ``oracle_names`` that runs (default: the
    baseline). A ``kernel`` provider passes :func:`gradkernels.testing.compare` with factor 2 for the
    output and 3 for each gradient; other providers are reported with their errors, without a bound.
    """
    rows: list[Row] = []
    names = list(oracle_names) or [p.name for p in providers if p.baseline]
    for case in cases:
        inputs = case.make_inputs(device)
        dout = case.make_grad_output(device)
        ref_out, ref_grads, floors = _oracle(case, inputs, dout)
        results: dict[str, tuple] = {}
        for p in providers:
            try:
                results[p.name] = _forward_backward(lambda: p.fn(case, inputs), inputs, dout)
            except Exception as exc:
                results[p.name] = describe_error(exc)
        oracle = next((n for n in names if isinstance(results.get(n), tuple)), None)
        for p in providers:
            row = _row(suite, case, p, "check")
            res = results[p.name]
            if isinstance(res, str):
                row.status = res
            else:
                out, grads = res
                row.max_err = testing.max_err(out, ref_out)
                row.grad_err = max((testing.max_err(g, ref_grads[k]) for k, g in grads.items()), default=0.0)
                if p.kernel:
                    same = results[oracle] if oracle is not None else None
                    row.status = _judge(row, out, grads, same, ref_out, ref_grads, floors)
                elif p.name == oracle:
                    row.status = "ok (oracle)"
            rows.append(row)
            if progress:
                progress.step(f"{suite} check {case.label()} {p.name}: {row.status}")
    return rows


def _judge(row: Row, out, grads: dict, same, ref_out, ref_grads: dict, floors) -> str:
    """Fill the row's bounds from :func:`gradkernels.testing.compare` and say ``ok`` or what failed.

    ``err_bound`` is what the rule allows where the output's error is largest; the gradient columns are
    those of the gradient nearest its limit.
    """
    if same is None:
        return "unavailable: no torch oracle ran in this dtype"
    same_out, same_grads = same
    floors = floors or {}
    failures = []
    check = testing.compare(out, same_out, ref_out, testing.FACTOR_OUTPUT, floor=floors.get("out"), name="output")
    row.err_bound = check.allowed_at_max
    if not check.ok:
        failures.append(check.message)
    worst = None
    for k, g in grads.items():
        c = testing.compare(g, same_grads[k], ref_grads[k], testing.FACTOR_GRAD, floor=floors.get(k), name=f"d{k}")
        if not c.ok:
            failures.append(c.message)
        if worst is None or c.ratio < worst.ratio:
            worst = c
    if worst is not None:
        row.grad_err, row.grad_err_bound = worst.err, worst.allowed_at_max
    return "ok" if not failures else "failed: " + "; ".join(failures)
