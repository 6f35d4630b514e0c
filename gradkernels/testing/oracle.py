"""Reference results for the accuracy checks, computed more precisely than the dtype under test.

For fp16, bf16 and fp32 inputs an fp64 computation is precise enough: its rounding is 2^29 times smaller
than fp32's. For fp64 inputs it is not: torch's fp64 path would be the reference itself, and any other
summation order (another BLAS, a tiled kernel) differs from it by rounding that no rule can call wrong.
So fp64 references are computed in higher precision:

- ``"longdouble"``: ``numpy.longdouble`` arithmetic where it has a 64-bit significand or more (x87
  extended precision on x86, IEEE quad on aarch64 Linux): unit roundoff 2^-64, 2048 times below fp64's.
- ``"compensated"``: where ``longdouble`` is plain double (Windows, macOS on arm64), fp64 dot products and
  sums with error-free transformations (Ogita, Rump and Oishi, "Accurate sum and dot product", 2005:
  TwoProduct by Dekker's splitting, TwoSum by Knuth): the result is as accurate as if computed in twice
  the working precision, then rounded: ``|result - exact| <= u |exact| + (K u)^2 sum|a_k b_k|``.

The set-up picks the first that the platform supports (``method()``); ``GRADKERNELS_ORACLE=compensated``
forces the second (the tests run both and compare them). Every result comes back as an fp64 tensor on
the inputs' device: one rounding (half an fp64 ulp) from the high-precision value, which the rounding
bounds of :mod:`gradkernels.testing.bounds` include.

References: :func:`linear_reference` (forward, pre-activation and the three gradients of
``act(x W^T + b)``) and :func:`attention_reference` (output, log-sum-exp and the three gradients of
``softmax(q k^T * scale) v`` with GQA and either causal alignment). Elementwise activations and their
derivatives are evaluated by torch in fp64 on the (rounded) high-precision pre-activation: only the
reductions need the extra precision, the elementwise error is part of the bound.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
import torch

from .. import reference

__all__ = ["METHODS", "method", "matmul", "linear_reference", "attention_reference", "attention_reference_varlen",
           "varlen_apply", "torch_attention", "torch_attention_varlen"]

METHODS = ("longdouble", "compensated", "fp64")

# 2^27 + 1: Dekker's splitting constant for fp64 (53-bit significand split into two 26-bit halves).
_SPLITTER = 134217729.0


def method(dtype: torch.dtype = torch.float64) -> str:
    """How references for inputs of ``dtype`` are computed: ``"fp64"`` below fp64, else the platform's
    high-precision method (``"longdouble"`` or ``"compensated"``; ``GRADKERNELS_ORACLE`` overrides)."""
    if dtype != torch.float64:
        return "fp64"
    forced = os.environ.get("GRADKERNELS_ORACLE", "")
    if forced:
        if forced not in ("longdouble", "compensated"):
            raise ValueError(f"GRADKERNELS_ORACLE must be 'longdouble' or 'compensated', got {forced!r}")
        if forced == "longdouble" and not _longdouble_is_wider():
            raise ValueError("GRADKERNELS_ORACLE=longdouble, but numpy.longdouble is plain double here")
        return forced
    return "longdouble" if _longdouble_is_wider() else "compensated"


def _longdouble_is_wider() -> bool:
    return np.finfo(np.longdouble).nmant >= 63


def _check_method(how: str | None, dtype: torch.dtype) -> str:
    how = method(dtype) if how is None else how
    if how not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {how!r}")
    if how == "longdouble" and not _longdouble_is_wider():
        raise ValueError("method='longdouble' needs a numpy.longdouble wider than double")
    return how


def one_thread(fn):
    """Run ``fn`` with one intra-op thread for CPU inputs: the bounds and the references' torch parts
    are many small elementwise ops, for which thread hand-offs cost more than the work (50x slower with
    2 threads on a loaded 2-core machine). The caller's setting is restored."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        on_cpu = all(t.device.type == "cpu" for t in args if isinstance(t, torch.Tensor))
        with _threads(1) if on_cpu else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# High-precision arrays: numpy arrays in the method's dtype (longdouble, or fp64 for the others)
# ----------------------------------------------------------------------------------------------------


def _to_array(t: torch.Tensor, how: str) -> np.ndarray:
    a = t.detach().to("cpu", torch.float64).numpy()  # every float dtype embeds exactly in fp64
    return a.astype(np.longdouble) if how == "longdouble" else a


def _to_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(like.device)


def _two_sum(a, b):
    s = a + b
    z = s - a
    return s, (a - (s - z)) + (b - z)


def _two_prod(a, b):
    p = a * b
    a1 = _SPLITTER * a
    a_hi = a1 - (a1 - a)
    a_lo = a - a_hi
    b1 = _SPLITTER * b
    b_hi = b1 - (b1 - b)
    b_lo = b - b_hi
    return p, a_lo * b_lo - (((p - a_hi * b_hi) - a_lo * b_hi) - a_hi * b_lo)


def _matmul_compensated(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (batched, fp64) with Ogita-Rump-Oishi's Dot2: one pass over K, exact products and sums
    carried as (value, error) pairs, the errors summed in fp64 and added once at the end."""
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    s = np.zeros(shape)
    c = np.zeros(shape)
    with np.errstate(over="ignore", invalid="ignore"):  # the splitting of huge values; not our ranges
        for i in range(a.shape[-1]):
            p, e = _two_prod(a[..., :, i : i + 1], b[..., i : i + 1, :])
            s, t = _two_sum(s, p)
            c += t + e
    return s + c


def _matmul(a: np.ndarray, b: np.ndarray, how: str) -> np.ndarray:
    if how == "compensated":
        return _matmul_compensated(a, b)
    return np.matmul(a, b)  # longdouble: numpy's own loop in extended precision; fp64: BLAS


def _sum_last(a: np.ndarray, how: str) -> np.ndarray:
    """Sum over the last axis, as accurately as the method's products."""
    if how == "compensated":
        return _matmul_compensated(a, np.ones((a.shape[-1], 1)))[..., 0]
    return a.sum(-1)


def matmul(a: torch.Tensor, b: torch.Tensor, *, method: str | None = None) -> torch.Tensor:
    """``a @ b`` (batched like ``torch.matmul``) in high precision, rounded once to fp64.

    Args:
        a, b: float tensors, any dtype (converted exactly to fp64 first).
        method: ``"longdouble"``, ``"compensated"`` or ``"fp64"``; default the platform's
            high-precision method.
    """
    how = _check_method(method, torch.float64)
    return _to_tensor(_matmul(_to_array(a, how), _to_array(b, how), how), a)


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


def _activation_and_grad(pre: torch.Tensor, activation, grad_out):
    """``act(pre)`` and ``grad_out * act'(pre)`` by torch in fp64 (its own formulas)."""
    p = pre.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = reference.activation_fn(p, activation)
        if grad_out is None:
            return y.detach(), None
        (g,) = torch.autograd.grad(y, p, grad_out.to(torch.float64))
    return y.detach(), g


@one_thread
def linear_reference(x, weight, bias=None, activation=None, grad_out=None, *, pre=None,
                     method: str | None = None) -> dict:
    """``act(x @ W^T + b)``, its pre-activation and gradients, more precisely than ``x.dtype``.

    Args:
        x: (..., K); weight: (N, K); bias: (N,) or None; activation: a name of
            ``gradkernels.reference.ACTIVATIONS``.
        grad_out: (..., N) output gradient, or None for the forward only.
        pre: a given (..., N) pre-activation for the gradients (a backward-only check); the forward
            entries are then not computed.
        method: see :func:`method`; default by x's dtype.

    Returns:
        fp64 tensors on x's device: ``out`` and ``pre`` (unless ``pre`` is given), and with ``grad_out``
        ``dx``, ``dw`` and ``db`` (the row sums of dY', whether or not there is a bias).
    """
    how = _check_method(method, x.dtype)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    result = {}
    if pre is None:
        xa, wa = _to_array(x2, how), _to_array(weight, how)
        pre_a = _matmul(xa, wa.T, how)
        if bias is not None:
            pre_a = pre_a + _to_array(bias, how)
        pre64 = _to_tensor(pre_a, x).reshape(*x.shape[:-1], n)
        result["pre"] = pre64
    else:
        pre64 = pre.to(torch.float64)
    out, g = _activation_and_grad(pre64, activation, grad_out)
    if pre is None:
        result["out"] = out
    if grad_out is None:
        return result
    g2 = g.reshape(-1, n)
    ga = _to_array(g2, how)
    result["dx"] = _to_tensor(_matmul(ga, _to_array(weight, how), how), x).reshape(x.shape)
    result["dw"] = _to_tensor(_matmul(ga.T, _to_array(x2, how), how), x)
    result["db"] = _to_tensor(_sum_last(ga.T, how), x)
    return result


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def causal_offset(lq: int, lk: int, causal: bool, align: str = "bottom_right") -> int | None:
    """The key offset of a causal mask (key j visible to query i iff ``j <= i + offset``), or None."""
    if not causal:
        return None
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    return lk - lq if align == "bottom_right" else 0


def visible_keys(lq: int, lk: int, offset: int | None, device=None, *, window=None) -> torch.Tensor:
    """(lq, lk) boolean mask: True where query i sees key j.

    ``offset``: the causal offset (key j visible iff ``j <= i + offset``; None: no causal mask). With
    ``window = (diag, left, right)`` instead: ``diag - left <= j - i <= diag + right``, -1 unbounded.
    """
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    if window is not None:  # written out here, not the library's mask: the oracle stays independent
        diag, left, right = window
        visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
        if right >= 0:
            visible &= j <= i + diag + right
        if left >= 0:
            visible &= j >= i + diag - left
        return visible
    if offset is None:
        return torch.ones(lq, lk, dtype=torch.bool, device=device)
    return j <= i + offset


def diagonal(lq: int, lk: int, align: str = "bottom_right") -> int:
    """The diagonal ``j - i`` of an alignment: ``Lk - Lq`` bottom-right, 0 top-left."""
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    return lk - lq if align == "bottom_right" else 0


def window_of(lq: int, lk: int, causal: bool, align: str = "bottom_right", window_size=(-1, -1)):
    """``(diag, left, right)`` of a call: the window relative to the alignment's diagonal, right 0 if causal."""
    left, right = window_size
    return diagonal(lq, lk, align), left, (0 if causal else right)


def _alibi_bias(alibi_slopes, b, h, lq, lk, diag, dtype, how):
    """``slope * |j - i - diag|`` as a (B or 1, H, Lq, Lk) high-precision array, or None."""
    if alibi_slopes is None:
        return None
    slopes = _to_array(alibi_slopes, how).astype(dtype)
    slopes = slopes.reshape(1, h, 1, 1) if slopes.ndim == 1 else slopes.reshape(b, h, 1, 1)
    rel = np.abs(np.arange(lk)[None, :] - np.arange(lq)[:, None] - diag).astype(dtype)
    return slopes * rel


@one_thread
def attention_reference(q, k, v, grad_out=None, *, causal: bool = False, align: str = "bottom_right",
                        scale: float | None = None, method: str | None = None, window_size=(-1, -1),
                        softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0, dropout_mask=None) -> dict:
    """``softmax(q k^T * scale) v``, its natural-log LSE and gradients, more precisely than q's dtype.

    Shapes as :func:`gradkernels.attention`: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv),
    Hq a multiple of Hkv. Rows that see no key give output 0, LSE -inf and zero gradients.

    Features (semantics of :mod:`gradkernels.ops.attention_features`, relative to the alignment's
    diagonal): ``window_size`` (left, right), -1 unbounded, right 0 with ``causal``; ``softcap`` > 0:
    scores ``softcap * tanh(s / softcap)`` (tanh in the high precision); ``alibi_slopes`` (Hq,) or
    (B, Hq): ``- slope * |j - i - diag|``; dropout: ``dropout_mask`` (B, Hq, Lq, Lk) bool, the keep-mask
    (e.g. :func:`gradkernels.dropout_mask`), with ``dropout_p``: weights times ``mask / (1 - p)``. The
    LSE is that of the scores before dropout.

    Returns:
        fp64 tensors on q's device: ``out``, ``lse`` and, with ``grad_out``, ``dq``, ``dk``, ``dv``.
    """
    how = _check_method(method, q.dtype)
    if (dropout_p > 0) != (dropout_mask is not None):
        raise ValueError("dropout_p > 0 needs its dropout_mask (and a mask needs dropout_p > 0)")
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    diag, left, right = window_of(lq, lk, causal, align, window_size)
    mask = visible_keys(lq, lk, None, window=(diag, left, right)).numpy()
    qa = _to_array(q, how)
    ka = np.repeat(_to_array(k, how), group, axis=1)
    va = np.repeat(_to_array(v, how), group, axis=1)
    hp = qa.dtype.type
    s = _matmul(qa, np.swapaxes(ka, -1, -2), how) * hp(scale)
    t = None
    if softcap > 0:
        t = np.tanh(s / hp(softcap))
        s = t * hp(softcap)
    bias = _alibi_bias(alibi_slopes, b, hq, lq, lk, diag, qa.dtype, how)
    if bias is not None:
        s = s - bias
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    seen = np.isfinite(m)
    m = np.where(seen, m, 0)
    e = np.where(mask, np.exp(s - m), 0)
    ell = _sum_last(e, how)[..., None]
    p = np.where(seen, e / np.where(seen, ell, 1), 0)
    z = None
    if dropout_mask is not None:
        z = dropout_mask.detach().cpu().numpy().astype(qa.dtype) / (hp(1) - hp(dropout_p))
    pz = p if z is None else p * z
    out = _matmul(pz, va, how)
    lse = np.where(seen, m + np.log(np.where(seen, ell, 1)), -np.inf)[..., 0]
    result = {"out": _to_tensor(out, q), "lse": _to_tensor(lse, q)}
    if grad_out is None:
        return result
    do = _to_array(grad_out, how)
    dp = _matmul(do, np.swapaxes(va, -1, -2), how)
    if z is not None:
        dp = dp * z
    delta = _sum_last(p * dp, how)[..., None]
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = _matmul(ds, ka, how) * hp(scale)
    dk = _matmul(np.swapaxes(ds, -1, -2), qa, how) * hp(scale)
    dv = _matmul(np.swapaxes(pz, -1, -2), do, how)
    dk = _sum_last(np.moveaxis(dk.reshape(b, hkv, group, lk, d), 2, -1), how)
    dv = _sum_last(np.moveaxis(dv.reshape(b, hkv, group, lk, dv.shape[-1]), 2, -1), how)
    result.update(dq=_to_tensor(dq, q), dk=_to_tensor(dk, q), dv=_to_tensor(dv, q))
    return result


def varlen_sequences(cu_seqlens_q, cu_seqlens_k):
    """``[(start_q, end_q, start_k, end_k)]`` per sequence of a varlen batch."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[s], cq[s + 1], ck[s], ck[s + 1]) for s in range(len(cq) - 1)]


def varlen_apply(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, grad_out=None, *, alibi_slopes=None, dropout_masks=None,
                 **kwargs) -> dict:
    """Run a dense reference or bound ``fn(q, k, v, grad_out, **kwargs)`` per sequence of a varlen batch
    and pack the results as :func:`gradkernels.attention_varlen` lays them out: ``out`` (total_q, Hq, Dv),
    ``lse`` (Hq, total_q), ``dq``/``dk``/``dv`` like q/k/v. ``alibi_slopes`` (batch, Hq) are split per
    sequence; ``dropout_masks``: a list of per-sequence keep-masks (Hq, Lq_s, Lk_s)."""
    parts = []
    for s, (q0, q1, k0, k1) in enumerate(varlen_sequences(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0 or k1 == k0:  # nothing to compute: output 0, LSE -inf, gradients 0 (the defaults)
            continue
        sl = alibi_slopes[s] if (alibi_slopes is not None and alibi_slopes.dim() == 2) else alibi_slopes
        extra = {} if dropout_masks is None else {"dropout_mask": dropout_masks[s][None]}
        if alibi_slopes is not None:
            extra["alibi_slopes"] = sl
        dense = [t[a:c].transpose(0, 1).unsqueeze(0) for t, (a, c) in ((q, (q0, q1)), (k, (k0, k1)), (v, (k0, k1)))]
        g = None if grad_out is None else grad_out[q0:q1].transpose(0, 1).unsqueeze(0)
        parts.append(((q0, q1, k0, k1), fn(*dense, g, **kwargs, **extra)))
    hq, dv = q.shape[1], v.shape[-1]
    result = {"out": torch.zeros(q.shape[0], hq, dv, dtype=torch.float64, device=q.device),
              "lse": torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float64, device=q.device)}
    if grad_out is not None:
        result.update(dq=torch.zeros(q.shape, dtype=torch.float64, device=q.device),
                      dk=torch.zeros(k.shape, dtype=torch.float64, device=q.device),
                      dv=torch.zeros(v.shape, dtype=torch.float64, device=q.device))
    for (q0, q1, k0, k1), r in parts:
        for key, (a, c) in (("out", (q0, q1)), ("dq", (q0, q1)), ("dk", (k0, k1)), ("dv", (k0, k1))):
            if key in r and key in result:
                result[key][a:c] = r[key][0].transpose(0, 1)
        if "lse" in r:
            result["lse"][:, q0:q1] = r["lse"][0]
    return result


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, grad_out=None, **kwargs) -> dict:
    """:func:`attention_reference` of each sequence of a varlen batch (bottom-right per sequence), packed
    as :func:`gradkernels.attention_varlen` returns it (see :func:`varlen_apply`; ``dropout_masks``: a list
    of per-sequence keep-masks, e.g. :func:`gradkernels.dropout_mask_varlen`)."""
    return varlen_apply(attention_reference, q, k, v, cu_seqlens_q, cu_seqlens_k, grad_out, **kwargs)


def torch_attention(q, k, v, *, causal: bool = False, align: str = "bottom_right", scale: float | None = None,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0,
                    dropout_mask=None):
    """The second oracle for features: ``(out, lse)`` by composed torch ops in q's dtype (autograd records
    them), written from the definitions independently of ``gradkernels.reference`` (whose twins run the
    torch backend and must not be checked against themselves).

    Arguments as :func:`attention_reference`; the LSE is that of the scores before dropout.
    """
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    diag, left, right = window_of(lq, lk, causal, align, window_size)
    ke, ve = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = torch.matmul(q, ke.transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        s = s + slopes * -(i + diag - j).abs().to(s.dtype)
    visible = visible_keys(lq, lk, None, device=q.device, window=(diag, left, right))
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    w = torch.softmax(s, -1).nan_to_num(0.0)  # rows without a visible key: 0, not NaN
    if dropout_mask is not None:
        w = w * dropout_mask.to(w.dtype) / (1 - dropout_p)
    return w @ ve, lse


def torch_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, dropout_masks=None,
                           **kwargs):
    """:func:`torch_attention` per sequence of a varlen batch: ``(out (total_q, Hq, Dv), lse (Hq, total_q))``."""
    outs, lses = [], []
    for s, (q0, q1, k0, k1) in enumerate(varlen_sequences(cu_seqlens_q, cu_seqlens_k)):
        extra = dict(kwargs)
        if alibi_slopes is not None:
            extra["alibi_slopes"] = alibi_slopes[s] if alibi_slopes.dim() == 2 else alibi_slopes
        if dropout_masks is not None:
            extra["dropout_mask"] = dropout_masks[s][None]
        dense = [t[a:c].transpose(0, 1).unsqueeze(0) for t, (a, c) in ((q, (q0, q1)), (k, (k0, k1)), (v, (k0, k1)))]
        o, lse = torch_attention(*dense, **extra)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
