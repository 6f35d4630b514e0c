"""The accuracy rule of gradkernels, one place for the test suite and the benchmarks' checks.

Two oracles (flash-attention's method): a reference computed more precisely than the dtype under test
(``ref``), and PyTorch's own path in that dtype (``same``). A result ``ours`` passes when, elementwise,

    |ours - ref|  <=  factor * max|same - ref|  +  floor

with ``factor`` 2 for outputs and 3 for gradients. The first term scales with the dtype and the shape
without a hand-tuned tolerance; the floor keeps the rule meaningful where torch's error is tiny or zero.
The floor is the operation's rounding-error bound (:mod:`gradkernels.testing.bounds`: ``linear_bounds``,
``attention_bounds``), which every summation order satisfies, so no check depends on the BLAS, the tile
sizes or the split of a reduction. For fp64 the reference comes from :mod:`gradkernels.testing.oracle` in
extended precision (or compensated fp64 sums where ``numpy.longdouble`` is plain double): torch's fp64
path then has a measurable error of its own, and the floor covers the rest.

Checks of composite computations that have no derived bound (a whole model) fall back to a floor of a
few units of rounding at the reference's magnitude (``floor=None``); that floor is not order-independent,
so fp64 checks should pass a bound.

Margins: with ``GRADKERNELS_MARGIN_LOG=path`` in the environment, every :func:`assert_close` appends one
JSON line (the test, the check, the dtype, the error and what was allowed) to ``path``;
``python -m gradkernels.testing.margins path`` summarises them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from . import bounds, oracle
from .bounds import (
    Precision, attention_bounds, attention_bounds_varlen, gamma, kernel_precision, linear_bounds,
    reference_precision, unit_roundoff,
)
from .oracle import (
    attention_reference, attention_reference_varlen, linear_reference, torch_attention, torch_attention_varlen,
)

__all__ = [
    "FACTOR_OUTPUT", "FACTOR_GRAD", "Check", "compare", "assert_close", "max_err", "magnitude_floor",
    "record_margin", "MARGIN_LOG_ENV",
    "linear_reference", "attention_reference", "attention_reference_varlen", "linear_bounds", "attention_bounds",
    "attention_bounds_varlen", "torch_attention", "torch_attention_varlen",
    "Precision", "gamma", "unit_roundoff", "kernel_precision", "reference_precision", "bounds", "oracle",
]

FACTOR_OUTPUT = 2
FACTOR_GRAD = 3
MARGIN_LOG_ENV = "GRADKERNELS_MARGIN_LOG"


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in fp64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def magnitude_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The floor of checks without an operation bound: 2 units of ``dtype``'s rounding at the
    reference's largest magnitude (8 for fp64, where torch's path alone may be the reference)."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    ulps = 8 if dtype == torch.float64 else 2
    return ulps * torch.finfo(dtype).eps * max(scale, 1e-3)


@dataclass(frozen=True)
class Check:
    """The outcome of one comparison.

    ``err`` is the largest error, ``base`` torch's largest error; ``worst_*`` describe the element
    nearest its limit (``worst_allowed = factor * base + floor`` there). ``ratio`` = allowed / error at
    that element (the margin: > 1 passes), ``floor_ratio`` the smallest floor / error over all elements
    (how far the floor alone covers the error). ``floor_kind``: ``"bound"`` (an operation bound) or
    ``"magnitude"`` (:func:`magnitude_floor`). ``allowed_at_max``: what was allowed where the error is
    largest. ``magnitude_ratio``: the margin the former rule (``floor=None``) would have had there.
    """

    name: str
    dtype: str
    shape: tuple
    factor: float
    floor_kind: str
    err: float
    base: float
    worst_err: float
    worst_allowed: float
    worst_floor: float
    worst_index: tuple
    allowed_at_max: float
    ratio: float
    floor_ratio: float
    ok: bool
    problem: str = ""
    magnitude_ratio: float = math.nan

    @property
    def message(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        verdict = "within" if self.ok else "exceeds"
        return (f"{self.name}: error {self.worst_err:.3e} at {list(self.worst_index)} {verdict} "
                f"{self.worst_allowed:.3e} = {self.factor:g} x torch's {self.base:.3e} + "
                f"{self.floor_kind} floor {self.worst_floor:.2e} (largest error {self.err:.3e}, "
                f"margin {self.ratio:.3g}x)")


def _failed(name, ours, factor, kind, problem) -> Check:
    return Check(name, str(ours.dtype).replace("torch.", ""), tuple(ours.shape), factor, kind, math.nan,
                 math.nan, math.nan, math.nan, math.nan, (), math.nan, 0.0, 0.0, False, problem)


def compare(ours: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, factor: float, *,
            floor: torch.Tensor | float | None = None, name: str = "output") -> Check:
    """Apply the rule (see the module docstring) and return the :class:`Check`, without raising.

    Args:
        ours: the result under test. same: torch's result in the same dtype. ref: the reference (fp64).
        factor: 2 for outputs, 3 for gradients.
        floor: elementwise (broadcastable) or scalar floor, normally from :func:`linear_bounds` /
            :func:`attention_bounds`; None: :func:`magnitude_floor`.
        name: what is compared, for messages.
    """
    kind = "magnitude" if floor is None else "bound"
    if ours.shape != ref.shape or same.shape != ref.shape:
        return _failed(name, ours, factor, kind,
                       f"shape {tuple(ours.shape)} (torch {tuple(same.shape)}) != reference {tuple(ref.shape)}")
    if ours.dtype != same.dtype:
        return _failed(name, ours, factor, kind, f"dtype {ours.dtype} != torch's {same.dtype}")
    if not torch.isfinite(ours).all():
        return _failed(name, ours, factor, kind, "non-finite values")
    ref64 = ref.detach().double()
    err = (ours.detach().double() - ref64).abs()
    base = max_err(same.detach(), ref64)
    if floor is None:
        floor_t = torch.full_like(err, magnitude_floor(ref64, ours.dtype))
    else:
        floor_t = torch.as_tensor(floor, dtype=torch.float64, device=err.device).expand_as(err)
    allowed = factor * base + floor_t
    if err.numel() == 0:
        return Check(name, str(ours.dtype).replace("torch.", ""), tuple(ours.shape), factor, kind, 0.0, base,
                     0.0, 0.0, 0.0, (), 0.0, math.inf, math.inf, True)
    # The element nearest its limit: the largest err / allowed (err > 0 against allowed 0 is infinite).
    use = torch.where(err > 0, err / allowed, torch.zeros_like(err))
    flat = int(use.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else ()
    worst_err = err.reshape(-1)[flat].item()
    worst_allowed = allowed.reshape(-1)[flat].item()
    worst_floor = floor_t.reshape(-1)[flat].item()
    top = use.reshape(-1)[flat].item()
    ratio = math.inf if top == 0 else 1 / top
    floor_use = torch.where(err > 0, err / floor_t, torch.zeros_like(err)).max().item()
    floor_ratio = math.inf if floor_use == 0 else 1 / floor_use
    at_max = int(err.reshape(-1).argmax())
    largest = err.reshape(-1)[at_max].item()
    old = factor * base + magnitude_floor(ref64, ours.dtype)
    magnitude_ratio = math.inf if largest == 0 else old / largest
    ok = bool((err <= allowed).all())
    return Check(name, str(ours.dtype).replace("torch.", ""), tuple(ours.shape), factor, kind, largest, base,
                 worst_err, worst_allowed, worst_floor, index, allowed.reshape(-1)[at_max].item(), ratio,
                 floor_ratio, ok, magnitude_ratio=magnitude_ratio)


def assert_close(ours: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, factor: float,
                 name: str = "output", *, floor: torch.Tensor | float | None = None) -> Check:
    """:func:`compare`, raising ``AssertionError`` with the details when the rule is broken.

    Records the check's margin when ``GRADKERNELS_MARGIN_LOG`` is set. Returns the :class:`Check`.
    """
    check = compare(ours, same, ref, factor, floor=floor, name=name)
    _log(check)
    assert check.ok, check.message
    return check


# ----------------------------------------------------------------------------------------------------
# Margin log
# ----------------------------------------------------------------------------------------------------


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]


def _append(entry: dict) -> None:
    path = os.environ.get(MARGIN_LOG_ENV)
    if not path:
        return
    line = json.dumps(entry, default=str) + "\n"
    # One write of one short line in append mode: lines of parallel test workers do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _log(check: Check) -> None:
    if os.environ.get(MARGIN_LOG_ENV):
        entry = {"test": _current_test(), **asdict(check)}
        for key in ("ratio", "floor_ratio", "magnitude_ratio"):
            if math.isinf(entry[key]):
                entry[key] = None  # JSON has no infinity: None = no error at all
        _append(entry)


def record_margin(name: str, dtype: torch.dtype, err: float, allowed: float, floor_kind: str = "derived") -> None:
    """Log a check made outside :func:`assert_close` (a scalar error against its allowed value)."""
    if not os.environ.get(MARGIN_LOG_ENV):
        return
    ratio = None if err == 0 else allowed / err
    _append({"test": _current_test(), "name": name, "dtype": str(dtype).replace("torch.", ""), "shape": [],
             "factor": None, "floor_kind": floor_kind, "err": err, "base": None, "worst_err": err,
             "worst_allowed": allowed, "worst_floor": None, "worst_index": [], "allowed_at_max": allowed,
             "ratio": ratio,
             "floor_ratio": None, "ok": err <= allowed, "problem": ""})
