"""Rounding-error bounds of the kernels' operations: the floor of the accuracy rule.

A bound here does not depend on the summation order, so a check that uses it cannot fail because another
machine's BLAS, another tile size or another split adds the same terms in another order. For fp64 the
tool is the standard worst-case analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
ed., ch. 3): a sum or dot product of K terms computed in any order with unit roundoff u satisfies

    |fl(sum a_k b_k) - sum a_k b_k|  <=  gamma_K * sum |a_k b_k|,      gamma_K = K u / (1 - K u),

so a product C = A B is off by at most ``gamma_K * (|A| @ |B|)`` elementwise. Everything else is first-
order propagation of such bounds through the computation, with absolute values throughout:

- **Linear** ``y = act(x W^T + b)``: pre-activation ``gamma_{K+1} (|x| |W|^T + |b|)``; through the
  activation by its Lipschitz constant, plus the activation's own evaluation error; the backward's
  ``dY' = dY * act'(pre)`` inherits the stored pre-activation's error through ``sup |act''|`` (and for
  ``relu``, whose derivative jumps at 0, any entry whose sign the rounding could flip may take either
  value); then ``dX = dY' W``, ``dW = dY'^T X`` (reduction over the M rows), ``db = sum dY'``, each with
  its own gamma and the inherited ``|E_dY'| @ |.|``.
- **Attention**: scores ``s = scale q k^T`` are off by ``delta = scale gamma_D |q| |k|^T`` (plus the
  scaling's roundings); a softmax perturbed by ``delta`` moves each probability by at most
  ``p_ij ((1 - p_ij) delta_ij + sum_{k != j} p_ik delta_ik)`` (first order; the normalisation cancels
  the common part); the LSE by ``sum_j p_ij delta_ij``. The output adds ``gamma_Lk P |V|`` and the online
  softmax's rescalings. The backward recomputes ``P = exp(s - LSE)`` from the stored LSE (relative error
  ``delta + E_LSE``), then ``dV = P^T dO`` (reduction over the GQA group's query rows),
  ``dP = dO V^T`` (over Dv), ``Delta = rowsum(dO * O)`` (or ``rowsum(P * dP)``, the larger of the two
  bounds), ``dS = P * (dP - Delta)``, ``dQ = scale dS K`` (over Lk), ``dK = scale dS^T Q``.

Each computation is described by a :class:`Precision`: unit roundoffs of its accumulations, its
pointwise math, the tensors it stores between stages in the input dtype (P and dS before their matmuls,
the pre-activation, dY'), and its outputs. A check compares the kernel with a reference, so its floor is
the kernel's bound plus the reference's (:func:`kernel_precision`, :func:`reference_precision`).

In fp64 the bounds are worst cases: on random data the observed error is typically 10-1000 times
smaller (the errors of a long sum mostly cancel). That is the price of never depending on the order; a
real bug (a wrong mask, scale, row, a dropped term, fp32 accumulation of fp64 inputs, one element off by
1e-10) is still orders of magnitude above them (``tests/test_testing.py`` checks that).

Below fp64 the same model runs in its statistical form (``Precision.worst_case=False``): each reduction
counts ``2 u sqrt(K) (|sum| + ||terms||_2)`` (about 3.5 standard deviations of the random-rounding
model, for any order) and errors of independent entries propagate in quadrature. There torch's own error
in the same dtype is the main term of the rule, as before; a worst-case floor would be 100-1000 times
the typical error and let real bugs through (tf32-rounded products at K = 1024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import reference
from . import oracle

__all__ = [
    "Precision", "unit_roundoff", "gamma", "kernel_precision", "reference_precision",
    "ACTIVATION_BOUNDS", "linear_bounds", "attention_bounds", "attention_bounds_varlen",
]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the relative error of one rounding to nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def _tiny(dtype: torch.dtype) -> float:
    """The absolute rounding error near zero (half the subnormal spacing) of ``dtype``."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: bound on the relative error of n roundings."""
    nu = n * u
    return nu / (1 - nu) if nu < 1 else math.inf


@dataclass(frozen=True)
class Precision:
    """Unit roundoffs of one way of computing an operation, and how its reductions are bounded.

    Attributes:
        reduction: accumulation of sums and dot products.
        pointwise: elementwise arithmetic and functions (exp, log, erf, products, scaling).
        stored: tensors written in a narrower dtype between stages (P and dS before their matmuls, the
            pre-activation and dY' of the linear backward): 0 when nothing is narrowed.
        output: rounding of the returned tensors to their dtype (0 when the result is compared as is).
        operand: rounding of matmul operands before multiplying (tf32), 0 otherwise.
        tiny: absolute rounding error near zero (subnormals) of the stored and output dtypes.
        worst_case: bound reductions by ``gamma_K sum|a_k b_k|`` (every order, a guarantee); False: by the
            statistical size ``2 u sqrt(K) (|sum a_k b_k| + ||a o b||_2)`` (see :func:`reduction_error`).
    """

    reduction: float
    pointwise: float
    stored: float
    output: float
    operand: float = 0.0
    tiny: float = 0.0
    worst_case: bool = True


# How many standard deviations of the random-rounding model the statistical reduction term allows.
STATISTICAL_LAMBDA = 2.0


def reduction_error(pr: Precision, a: torch.Tensor, b: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Elementwise bound on the rounding error of ``a @ b`` computed with ``pr`` (fp64 tensors).

    Worst case (``pr.worst_case``): ``gamma_k * (|a| @ |b|)``, which every order of summation satisfies.
    Statistical: ``lambda u sqrt(k) (|a @ b| + sqrt(a^2 @ b^2))``, lambda = 2: with independent rounding
    errors of mean 0 (the standard probabilistic model), a sum of k terms in any order has partial sums
    about ``(j/k) S`` plus a random walk of ``||t||_2 sqrt(j/k)``, so its error has a standard deviation
    below ``u sqrt(k) (|S| + ||t||_2) / sqrt(3)``: the term is ~3.5 standard deviations of even the
    sequential order (blocked and pairwise orders, as BLAS and tiles use, err less). Matmul operands
    rounded to tf32 add ``2 u_operand |a| @ |b|`` in both. ``k`` defaults to the contracted length.
    """
    k = a.shape[-1] if k is None else k
    term = (gamma(k, pr.reduction) * (a.abs() @ b.abs()) if pr.worst_case else
            STATISTICAL_LAMBDA * pr.reduction * math.sqrt(k) * ((a @ b).abs() + ((a * a) @ (b * b)).sqrt()))
    return term + 2 * pr.operand * (a.abs() @ b.abs()) if pr.operand else term


def propagate(pr: Precision, e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The error of ``a @ b`` inherited from an elementwise error bound ``e`` of ``a`` (b exact).

    Worst case: ``e @ |b|``. Statistical: the errors of different entries of ``a`` are independent, so
    they add in quadrature: ``sqrt(e^2 @ b^2)`` (``e`` already holds the allowed deviation of each).
    """
    return e @ b.abs() if pr.worst_case else ((e * e) @ (b * b)).sqrt()


def propagate_sum(pr: Precision, e: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """:func:`propagate` through a sum over ``dim``."""
    return e.sum(dim, keepdim=keepdim) if pr.worst_case else (e * e).sum(dim, keepdim=keepdim).sqrt()


def rounding_error(pr: Precision, u: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The error of ``a @ b`` from rounding each entry of ``a`` with unit roundoff ``u`` first (P and dS
    stored in the input dtype before their matmuls): ``u |a| @ |b|``, statistically
    ``lambda u sqrt(a^2 @ b^2)``."""
    if not u:
        return torch.zeros((), dtype=a.dtype, device=a.device)
    if pr.worst_case:
        return u * (a.abs() @ b.abs())
    return STATISTICAL_LAMBDA * u * ((a * a) @ (b * b)).sqrt()


def sum_error(pr: Precision, t: torch.Tensor, dim: int = -1, keepdim: bool = False, n: int | None = None):
    """:func:`reduction_error` of ``t.sum(dim)`` (n: the number of terms, default t's size along dim)."""
    n = t.shape[dim] if n is None else n
    if pr.worst_case:
        return gamma(n, pr.reduction) * t.abs().sum(dim, keepdim=keepdim)
    return STATISTICAL_LAMBDA * pr.reduction * math.sqrt(n) * (
        t.sum(dim, keepdim=keepdim).abs() + (t * t).sum(dim, keepdim=keepdim).sqrt())


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def kernel_precision(dtype: torch.dtype, device="cpu") -> Precision:
    """The kernels' precision for ``dtype`` inputs: fp32 accumulation (fp64 for fp64), P/dS/dY' and
    outputs in the input dtype. 16-bit tensor-core products accumulate with truncation on some GPUs,
    so their accumulation counts 2u per step; fp32 on CUDA where torch allows tf32 rounds the operands.

    Reductions are bounded in the worst case for fp64 only. Below fp64 the worst case would be 100 to
    1000 times the typical error at the lengths tested and would hide real bugs (tf32 products where
    ieee was asked stay below it at K = 1024); there torch's own error in the same dtype is the main
    term of the rule, and the floor's reductions take their statistical size."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u_acc = unit_roundoff(acc)
    sixteen = dtype in (torch.float16, torch.bfloat16)
    on_cuda = torch.device(device).type == "cuda"
    operand = 2.0**-11 if (dtype == torch.float32 and on_cuda and _tf32_allowed()) else 0.0
    u_in = unit_roundoff(dtype)
    return Precision(reduction=2 * u_acc if sixteen else u_acc, pointwise=u_acc, stored=u_in, output=u_in,
                     operand=operand, tiny=_tiny(dtype), worst_case=dtype == torch.float64)


def reference_precision(dtype: torch.dtype) -> Precision:
    """The precision of the references of :mod:`gradkernels.testing.oracle` for ``dtype`` inputs.

    Below fp64: fp64 throughout, compared as is. fp64: reductions in extended precision (2^-64) or
    compensated (equivalent to about 2^-80 for any length up to 2^26), pointwise math in fp64 (the
    activations are evaluated by torch), results rounded once to fp64.
    """
    u64 = unit_roundoff(torch.float64)
    how = oracle.method(dtype)
    if how == "fp64":
        return Precision(reduction=u64, pointwise=u64, stored=0.0, output=0.0)
    reduction = 2.0**-64 if how == "longdouble" else 2.0**-80
    return Precision(reduction=reduction, pointwise=u64, stored=u64, output=u64, tiny=_tiny(torch.float64))


# ----------------------------------------------------------------------------------------------------
# Activations: (sup |act'|, sup |act''|, evaluation error model, derivative jumps)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationBound:
    """What the bounds need to know of an activation.

    ``slope`` >= sup |act'| and ``curvature`` >= sup |act''| over the reals (tests check both on a dense
    grid). ``smooth`` activations are evaluated through exp/erf/tanh formulas whose absolute error is at
    most ``8 u |x|`` for the value and ``6 u (1 + x^2)`` for the derivative (u of the arithmetic; the
    tanh form's derivative loses most, through ``1 - tanh^2`` near |x| = 6): measured at most a third
    of that (2.5 u |x|, 1.8 u (1 + x^2)) for the kernels' formulas and torch's fp64 ones against mpmath,
    and tested to stay below half (tests/test_testing.py). ``jump``: the derivative is discontinuous at 0 (relu).
    """

    slope: float
    curvature: float
    smooth: bool
    jump: bool = False


ACTIVATION_BOUNDS = {
    None: ActivationBound(1.0, 0.0, smooth=False),
    "relu": ActivationBound(1.0, 0.0, smooth=False, jump=True),
    "gelu": ActivationBound(1.2, 1.0, smooth=True),
    "gelu_tanh": ActivationBound(1.2, 1.0, smooth=True),
    "silu": ActivationBound(1.2, 1.0, smooth=True),
}


def _activation_bound(activation) -> ActivationBound:
    try:
        return ACTIVATION_BOUNDS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_BOUNDS)}, got {activation!r}") from None


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


def _linear_errors(pr: Precision, x, w, b, activation, dy, given_pre=None, jump=None) -> dict:
    """Bounds of one computation (``pr``) of the linear layer, fp64 tensors; x (M, K), dy (M, N).

    ``given_pre``: the backward reads this pre-activation (exact input) instead of the forward's."""
    act = _activation_bound(activation)
    m, k = x.shape
    ue = pr.pointwise
    if b is not None:  # the bias as one more term of each dot product
        x_aug = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        w_aug = torch.cat([w, b[:, None]], 1)
    else:
        x_aug, w_aug = x, w
    pre = x_aug @ w_aug.t() if given_pre is None else given_pre
    out, dact = _value_and_slope(pre, activation)
    e_pre = reduction_error(pr, x_aug, w_aug.t()) if given_pre is None else torch.zeros_like(pre)
    errors = {"pre": e_pre + pr.output * pre.abs() + pr.tiny}
    e_eval = 8 * ue * pre.abs() if act.smooth else 0.0
    errors["out"] = act.slope * e_pre + e_eval + pr.output * out.abs() + pr.tiny
    if dy is None:
        return errors
    e_pre_stored = e_pre + pr.stored * pre.abs() + pr.tiny if given_pre is None else e_pre
    g = dy * dact
    e_deval = 6 * ue * (1 + pre * pre) if act.smooth else 0.0
    e_g = dy.abs() * (act.curvature * e_pre_stored + e_deval) + (ue + pr.stored) * g.abs() + pr.tiny
    if jump is not None:
        e_g = e_g + torch.where(jump, dy.abs(), torch.zeros_like(dy))
    dx, dw, db = g @ w, g.t() @ x, g.sum(0)
    errors["dx"] = propagate(pr, e_g, w) + reduction_error(pr, g, w) + pr.output * dx.abs() + pr.tiny
    errors["dw"] = propagate(pr, e_g.t(), x) + reduction_error(pr, g.t(), x) + pr.output * dw.abs() + pr.tiny
    errors["db"] = propagate_sum(pr, e_g, 0) + sum_error(pr, g, 0) + pr.output * db.abs() + pr.tiny
    return errors


def _value_and_slope(pre: torch.Tensor, activation):
    p = pre.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = reference.activation_fn(p, activation)
        (d,) = torch.autograd.grad(y.sum(), p)
    return y.detach(), d


@oracle.one_thread
def linear_bounds(x, weight, bias=None, activation=None, grad_out=None, *, pre=None, dtype=None) -> dict:
    """Elementwise floors for checking ``act(x W^T + b)`` and its gradients: the kernels' rounding-error
    bound plus the reference's (:func:`gradkernels.testing.oracle.linear_reference`).

    Args:
        x, weight, bias, activation, grad_out: the inputs of the check (any float dtype).
        pre: the (..., N) pre-activation a backward-only check gives the kernels (as
            :func:`~gradkernels.testing.oracle.linear_reference`'s ``pre``): no forward error to inherit.
        dtype: the dtype the kernels compute in (default x's; pass fp16 for inputs cast by autocast).

    Returns:
        fp64 tensors shaped like the results: ``out``, ``pre`` and, with ``grad_out``, ``dx``, ``dw``,
        ``db`` (the row sums of dY', whether or not there is a bias).
    """
    dtype = x.dtype if dtype is None else dtype
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.detach().reshape(-1, k).double()
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    dy = grad_out.detach().reshape(-1, n).double() if grad_out is not None else None
    given = pre.detach().reshape(-1, n).double() if pre is not None else None
    kern = kernel_precision(dtype, x.device)
    ref = reference_precision(dtype)
    jump = None
    if dy is not None and given is None and _activation_bound(activation).jump:
        # relu' at a pre-activation within rounding of 0 may be 0 or 1 in either computation (and in
        # this fp64 computation of the pre-activation itself, the third term).
        computations = (kern, ref, reference_precision(torch.float32))
        slack = sum(_linear_errors(pr, x2, w, b, None, None)["pre"] for pr in computations)
        jump = (x2 @ w.t() + (b if b is not None else 0.0)).abs() <= slack
    a = _linear_errors(kern, x2, w, b, activation, dy, given, jump)
    r = _linear_errors(ref, x2, w, b, activation, dy, given)
    shapes = {"out": (*x.shape[:-1], n), "pre": (*x.shape[:-1], n), "dx": x.shape}
    result = {}
    for key in ("out", "pre", "dx", "dw", "db"):
        if key in a:
            result[key] = (a[key] + r[key]).reshape(shapes.get(key, a[key].shape))
    return result


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def _attention_errors(pr: Precision, q, k, v, do, scale: float, visible, group: int, softcap: float = 0.0,
                      bias=None, z=None) -> dict:
    """Bounds of one computation (``pr``) of attention; q (B, H, Lq, D), k and v expanded to H heads.

    Features: ``softcap`` > 0 (scores ``c tanh(s / c)``), ``bias`` (the ALiBi term subtracted from the
    scores, broadcastable to the scores), ``z`` (dropout: the keep-mask over ``1 - p``, multiplying P).
    """
    lq, lk = q.shape[-2], k.shape[-2]
    ue, us = pr.pointwise, pr.stored
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    kt, vt = k.transpose(-2, -1), v.transpose(-2, -1)

    raw = scale * (q @ kt)
    t = None
    if softcap > 0:
        t = torch.tanh(raw / softcap)
        s = softcap * t
    else:
        s = raw
    if bias is not None:
        s = s - bias
    s = torch.where(visible, s, -math.inf)
    lse = torch.logsumexp(s, -1, keepdim=True)
    seen = torch.isfinite(lse)
    lse_f = torch.where(seen, lse, zero)
    m_f = torch.where(seen, s.amax(-1, keepdim=True), zero)
    p = torch.where(visible & seen, torch.exp(s - lse_f), zero)
    s_f = torch.where(visible, s, zero)
    pz = p if z is None else p * z
    out = pz @ v

    if softcap == 0 and bias is None:
        # Scores: the product, and the roundings of scale * log2(e) and of the scaling.
        delta = torch.where(visible, abs(scale) * reduction_error(pr, q, kt) + 3 * ue * s_f.abs(), zero)
    else:
        # The product and the scaling's roundings, through the cap's slope 1 - t^2 <= 1; the cap's own
        # evaluation (tanh to 6 units absolute: an exp-based tanh loses up to that near 0, a few ulps
        # elsewhere, and the division and product by c); ALiBi: the rounded slope * distance and the
        # subtraction.
        e_raw = abs(scale) * reduction_error(pr, q, kt) + 3 * ue * raw.abs()
        if t is not None:
            e_raw = (1 - t * t) * e_raw + softcap * 6 * ue + 2 * ue * softcap * t.abs()
        if bias is not None:
            e_raw = e_raw + ue * (bias.abs() + s_f.abs())
        delta = torch.where(visible, e_raw + ue * s_f.abs(), zero)
    # Online softmax: up to one rescaling per 16-key block, each rounding acc and l and carrying the
    # exp2 of a max difference (at most the row's score range) into every earlier weight.
    blocks = math.ceil(lk / 16) + 1
    s_range = s_f.abs().amax(-1, keepdim=True)
    # exp2 and the reciprocal of l: up to 2 ulps each where GPUs use their approximate instructions.
    rho = delta + ue * (2 * s_f.abs() + 2 * m_f.abs() + 2 * lse_f.abs() + 2 * s_range + 2 * blocks + 8)
    rho = torch.where(visible, rho, zero)
    # Softmax: dp_ij = p_ij (rho_ij (1 - p_ij) - sum_{k != j} p_ik rho_ik) to first order.
    own = p * rho
    if pr.worst_case:
        others = own.sum(-1, keepdim=True) - own
    else:
        others = ((own * own).sum(-1, keepdim=True) - own * own).clamp_min(0).sqrt()
    second = torch.exp(2 * rho.amax(-1, keepdim=True))  # the first-order bound's second-order slack
    e_w = p * ((1 - p) * rho + others) * second
    # Relative error of the row sums l (and of the rescaled accumulators).
    sigma = sum_error(pr, p, -1, keepdim=True) + 2 * blocks * ue
    if z is not None:  # dropout: the weights times keep / (1 - p), one more rounding
        e_w = e_w * z + ue * pz
    e_out = (propagate(pr, e_w, v) + rounding_error(pr, us, pz, v) + reduction_error(pr, pz, v)
             + (sigma + 4 * ue + pr.output) * out.abs() + pr.tiny)
    log_l = (lse_f - m_f).abs()
    e_lse = propagate_sum(pr, p * delta, -1, keepdim=True) + sigma + ue * (3 * lse_f.abs() + 5 * log_l + 4)
    e_lse = torch.where(seen, e_lse, zero)
    errors = {"out": e_out, "lse": e_lse[..., 0]}
    if do is None:
        return errors

    # Backward: P recomputed from the stored LSE.
    rho_b = torch.where(visible, delta + e_lse + ue * (2 * s_f.abs() + 2 * lse_f.abs() + 8), zero)
    e_p = p * torch.expm1(rho_b)
    ado = do.abs()
    dp = do @ vt
    e_dp = reduction_error(pr, do, vt)
    if z is not None:  # dP = (dO V^T) * keep / (1 - p); dV = (P Z)^T dO
        dp, e_dp = dp * z, e_dp * z + ue * (dp * z).abs()
    e_pz = e_p if z is None else e_p * z + ue * pz
    delta_row = (do * out).sum(-1, keepdim=True)
    e_delta_kernel = propagate_sum(pr, ado * e_out, -1, keepdim=True) + sum_error(pr, do * out, -1, keepdim=True)
    e_delta_naive = (propagate_sum(pr, e_p * dp.abs() + p * e_dp, -1, keepdim=True)
                     + sum_error(pr, p * dp, -1, keepdim=True))
    e_delta = torch.maximum(e_delta_kernel, e_delta_naive)
    gap = torch.where(visible, (dp - delta_row).abs(), zero)
    ds = p * (dp - delta_row)
    e_ds = e_p * (gap + e_dp + e_delta) + p * (e_dp + e_delta) + 2 * ue * p * gap
    if t is not None:
        # dS times the cap's slope g = 1 - t^2, whose error is 2|t| times t's (the scores' error through
        # tanh, and its evaluation), plus its own roundings.
        g = 1 - t * t
        e_t = g * torch.where(visible, delta, zero) / softcap + 6 * ue
        e_g = 2 * t.abs() * e_t + 3 * ue
        ds, e_ds = ds * g, e_ds * g + ds.abs() * e_g + ue * (ds * g).abs()
    rows = group * (lq + 1)  # dK/dV: one accumulation over every query row of the GQA group
    pt, dst = pz.transpose(-2, -1), ds.transpose(-2, -1)
    dq, dk, dv = scale * (ds @ k), scale * (dst @ q), pt @ do
    e_dq = abs(scale) * (propagate(pr, e_ds, k) + rounding_error(pr, us, ds, k) + reduction_error(pr, ds, k))
    e_dk = abs(scale) * (propagate(pr, e_ds.transpose(-2, -1), q) + rounding_error(pr, us, dst, q)
                    + reduction_error(pr, dst, q, rows))
    e_dv = (propagate(pr, e_pz.transpose(-2, -1), do) + rounding_error(pr, us, pt, do)
            + reduction_error(pr, pt, do, rows))
    e_dk, e_dv, dk, dv = (_group_sum(x, group) for x in (e_dk, e_dv, dk, dv))
    finish = 3 * ue + pr.output
    errors.update(dq=e_dq + finish * dq.abs() + pr.tiny, dk=e_dk + finish * dk.abs() + pr.tiny,
                  dv=e_dv + pr.output * dv.abs() + pr.tiny)
    return errors


def _group_sum(t: torch.Tensor, group: int) -> torch.Tensor:
    b, h, length, dim = t.shape
    return t.reshape(b, h // group, group, length, dim).sum(2)


@oracle.one_thread
def attention_bounds(q, k, v, grad_out=None, *, causal: bool = False, align: str = "bottom_right",
                     scale: float | None = None, dtype=None, window_size=(-1, -1), softcap: float = 0.0,
                     alibi_slopes=None, dropout_p: float = 0.0, dropout_mask=None) -> dict:
    """Elementwise floors for checking attention and its gradients: the kernels' rounding-error bound
    plus the reference's (:func:`gradkernels.testing.oracle.attention_reference`).

    Args:
        q, k, v, grad_out: the inputs of the check, shapes as :func:`gradkernels.attention`.
        causal, align, scale: the attention computed (``align``: ``"bottom_right"`` or ``"top_left"``).
        dtype: the dtype the kernels compute in (default q's).
        window_size, softcap, alibi_slopes, dropout_p, dropout_mask: the features, as
            :func:`~gradkernels.testing.oracle.attention_reference` takes them. The softcap terms assume
            a tanh accurate to a few units of the accumulator's roundoff (an exp-based tanh, not a
            hardware approximation).

    Returns:
        fp64 tensors: ``out`` (B, Hq, Lq, Dv), ``lse`` (B, Hq, Lq) and, with ``grad_out``, ``dq``,
        ``dk``, ``dv`` shaped like q, k, v.
    """
    dtype = q.dtype if dtype is None else dtype
    b, hq, lq, d = q.shape
    lk = k.shape[-2]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qe = q.detach().double()
    ke, ve = (t.detach().double().repeat_interleave(group, dim=1) for t in (k, v))
    do = grad_out.detach().double() if grad_out is not None else None
    diag, left, right = oracle.window_of(lq, lk, causal, align, window_size)
    visible = oracle.visible_keys(lq, lk, None, device=q.device, window=(diag, left, right))
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().double()
        slopes = slopes.view(1, hq, 1, 1) if slopes.dim() == 1 else slopes.view(b, hq, 1, 1)
        rel = (torch.arange(lk, device=q.device)[None, :] - torch.arange(lq, device=q.device)[:, None] - diag)
        bias = slopes * rel.abs().double()
    z = None if dropout_mask is None else dropout_mask.double() / (1.0 - dropout_p)
    feats = dict(softcap=float(softcap), bias=bias, z=z)
    a = _attention_errors(kernel_precision(dtype, q.device), qe, ke, ve, do, scale, visible, group, **feats)
    r = _attention_errors(reference_precision(dtype), qe, ke, ve, do, scale, visible, group, **feats)
    return {key: a[key] + r[key] for key in a if not key.startswith("_")}


def attention_bounds_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, grad_out=None, **kwargs) -> dict:
    """:func:`attention_bounds` of each sequence of a varlen batch, packed as
    :func:`gradkernels.attention_varlen` lays its results out (see
    :func:`gradkernels.testing.oracle.varlen_apply`)."""
    return oracle.varlen_apply(attention_bounds, q, k, v, cu_seqlens_q, cu_seqlens_k, grad_out, **kwargs)
