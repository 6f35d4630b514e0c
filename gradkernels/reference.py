"""Textbook PyTorch paths every kernel is checked and benchmarked against.

- :class:`LinearFunction` and :func:`linear`: ``act(x @ W^T + b)`` with a hand-written backward.
- :class:`AttentionFunction`: naive attention that saves the full B x H x Lq x Lk softmax matrix and
  backpropagates through the softmax Jacobian-vector product ``P * (dP - rowsum(P * dP))``.
- :func:`standard_attention`: plain composed torch ops; autograd records the graph.
- :func:`linear_forward`, :func:`linear_backward`, :func:`attention_forward`, :func:`attention_backward`:
  the launchers of :mod:`gradkernels.ops` in plain torch, same arguments and results. They are the
  ``"torch"`` backend of :mod:`gradkernels` (CPU tensors without the interpreter): the custom ops run
  them instead of the kernels, so every backend shares one autograd route.
- :func:`activation_backward`: ``grad * act'(pre)`` by torch's own activation backward ops,
  differentiable (double backward) and exactly torch's at NaN and +-inf.
Attention here uses the library's causal convention: bottom-right aligned, query ``i`` sees keys
``j <= i + Lk - Lq``. Rows that see no key give output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops.attention import default_scale, empty_out, exact_lse, split_lse
from .ops.common import ACTIVATIONS, accumulator_dtype, activation_fns  # noqa: F401 (ACTIVATIONS: re-exported)

def activation_fn(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``torch`` implementation of each activation :func:`gradkernels.linear` fuses."""
    return activation_fns(activation)[0](x)


def activation_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``grad * act'(pre)`` through the aten backward op torch's autograd uses for each activation."""
    return activation_fns(activation)[1](grad, pre)


def linear_forward(x2, weight, bias=None, activation=None, store_pre=False):
    """:func:`gradkernels.ops.linear.linear_forward` in torch: ``(out, pre)``, pre None unless stored."""
    pre = F.linear(x2, weight, bias)
    out = activation_fn(pre, activation)
    return out, (pre if store_pre and activation is not None else None)


def linear_backward(grad2, x2, weight, pre, activation, need_dx, need_dw, need_db):
    """:func:`gradkernels.ops.linear.linear_backward` in torch: ``(dx, dw, db)``, None where not needed.

    ``x2`` is read only for dW and ``weight`` only for dX. Explicit shapes: K = 0 is not ambiguous.
    """
    g = activation_backward(grad2, pre, activation) if pre is not None else grad2
    dx = g @ weight if need_dx else None
    dw = g.t() @ x2 if need_dw else None
    db = g.sum(0) if need_db else None
    return dx, dw, db


class LinearFunction(torch.autograd.Function):
    """``x @ W^T + b`` saving X, W and b; backward ``dY @ W``, ``dY^T @ X``, ``dY.sum(0)``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        out = x @ weight.t()
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        m = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when in_features = 0
        x2 = x.reshape(m, x.shape[-1])
        g2 = grad_out.reshape(m, grad_out.shape[-1])
        dx = (g2 @ weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
        dw = g2.t() @ x2 if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x, weight, bias=None, activation=None):
    """Reference for :func:`gradkernels.linear`: ``act(x @ W^T + b)``."""
    return activation_fn(LinearFunction.apply(x, weight, bias), activation)


def causal_mask(lq: int, lk: int, *, align: str = "bottom_right", device=None) -> torch.Tensor:
    """Boolean (lq, lk) mask, True where query i may see key j.

    ``bottom_right`` (FlashAttention >= 2.1, this library): ``j <= i + lk - lq``.
    ``top_left`` (``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``): ``j <= i``.
    """
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    shift = lk - lq if align == "bottom_right" else 0
    return j <= i + shift


def _expand_kv(q, k, v):
    """Repeat K/V heads for grouped-query attention (Hq a multiple of Hkv)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return k, v


def _causal_offset(causal, lq, lk, align):
    """The launchers' ``causal_offset`` for a causal flag and alignment: key j visible iff j <= i + offset."""
    if not causal:
        return None
    return lk - lq if align == "bottom_right" else 0


def _scores(q, k, causal_offset, scale):
    s = (q @ k.transpose(-2, -1)) * scale
    if causal_offset is not None:
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(k.shape[-2], device=q.device)[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    return s


def _softmax_rows(s):
    """Softmax over the last dim and the row LSE; rows with no visible key give zeros (not NaN).

    P is ``torch.softmax`` (``exp(s - max) / sum``), not ``exp(s - lse)``: at logits of 1e4 and more a
    rounded LSE would cost P a relative 2^-8 in fp32. NaN in a row's scores gives a NaN row, as in torch.
    """
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    empty = lse == float("-inf")
    p = torch.where(empty, torch.zeros_like(s), torch.softmax(s, dim=-1))
    return p, lse.squeeze(-1)


def standard_attention(q, k, v, causal=False, scale=None, return_lse=False, align="bottom_right"):
    """Composed torch ops: ``softmax(q k^T * scale) v``; autograd records the whole graph.

    Shapes as :func:`gradkernels.attention`: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv).
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out, lse = attention_with_offset(q, k, v, _causal_offset(causal, q.shape[-2], k.shape[-2], align), scale)
    return (out, lse) if return_lse else out


def attention_with_offset(q, k, v, causal_offset, scale):
    """:func:`standard_attention` with the launchers' mask argument: ``(out, lse)`` by composed torch ops.

    ``causal_offset`` None: no mask; else key j is visible to query i iff ``j <= i + causal_offset``.
    """
    ke, ve = _expand_kv(q, k, v)
    p, lse = _softmax_rows(_scores(q, ke, causal_offset, scale))
    return p @ ve, lse


def attention_forward(q, k, v, causal_offset, scale):
    """:func:`gradkernels.ops.attention.attention_forward` in torch: ``(out, lse, lse_lo)``.

    Computed in the kernels' accumulator dtype (fp32; fp64 for fp64 inputs). ``out`` is laid out as the
    launcher lays it out (q's memory order), ``lse`` is ``-inf`` where a row sees no key, and ``lse_lo``
    its residual (:func:`gradkernels.ops.attention.split_lse` of the LSE of the scores taken in fp64).
    """

    acc = accumulator_dtype(q.dtype)
    ke, ve = _expand_kv(q, k, v)
    s = _scores(q.to(acc), ke.to(acc), causal_offset, scale)
    p, _ = _softmax_rows(s)
    out = empty_out(q, v.shape[-1])
    out.copy_(p @ ve.to(acc))
    lse, lse_lo = split_lse(torch.logsumexp(s.double(), dim=-1), acc)
    return out, lse, lse_lo


def attention_backward(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale, *, need_dq=True,
                       need_dk=True, need_dv=True):
    """:func:`gradkernels.ops.attention.attention_backward` in torch: P recomputed from q, k and the LSE.

    The launcher's contract: ``P = exp(s - LSE)`` with the LSE given as ``(lse, lse_lo)`` (the rows' LSE
    over all their keys, which may be more than ``k`` holds: ring attention hands each block the merged
    one), taken exactly in fp64 (:func:`gradkernels.ops.attention.exact_lse`), so P is as exact as the
    forward's at any logit size. Accumulator dtype as the forward.

    ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K * scale``, ``dK = dS^T Q * scale``,
    dK and dV summed over each query-head group. Returns ``(dq, dk, dv)``, None where not needed.
    """

    acc = accumulator_dtype(q.dtype)
    ke, ve = _expand_kv(q, k, v)
    s = _scores(q.to(acc), ke.to(acc), causal_offset, scale)
    row = exact_lse(lse, lse_lo)[..., None]
    p = torch.where(row == float("-inf"), 0.0, torch.exp(s.double() - row)).to(acc)
    do = grad_out.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (do @ ve.to(acc).transpose(-2, -1) - delta)
    group = q.shape[1] // k.shape[1]

    def per_kv_head(t):  # (B, Hq, Lk, d) -> (B, Hkv, Lk, d): sum over the query-head group
        return t.reshape(t.shape[0], k.shape[1], group, *t.shape[2:]).sum(2) if group > 1 else t

    def like(t, value):  # in t's layout, as the launcher allocates its gradient (torch.empty_like)
        return torch.empty_like(t).copy_(value)

    dq = like(q, (ds @ ke.to(acc)) * scale) if need_dq else None
    dk = like(k, per_kv_head((ds.transpose(-2, -1) @ q.to(acc)) * scale)) if need_dk else None
    dv = like(v, per_kv_head(p.transpose(-2, -1) @ do)) if need_dv else None
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Naive attention that saves the B x H x Lq x Lk softmax matrix P for backward.

    Backward: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(P * dP))``,
    ``dQ = dS K * scale``, ``dK = dS^T Q * scale`` (summed over each GQA group).
    """

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None, align="bottom_right"):
        scale = default_scale(q.shape[-1]) if scale is None else scale
        offset = _causal_offset(causal, q.shape[-2], k.shape[-2], align)
        ke, ve = _expand_kv(q, k, v)
        p, _ = _softmax_rows(_scores(q, ke, offset, scale))
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return p @ ve

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, p = ctx.saved_tensors
        ke, ve = _expand_kv(q, k, v)
        dv = p.transpose(-2, -1) @ grad_out
        dp = grad_out @ ve.transpose(-2, -1)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq = (ds @ ke) * ctx.scale
        dk = (ds.transpose(-2, -1) @ q) * ctx.scale
        group = q.shape[1] // k.shape[1]
        if group > 1:
            b, _, lk, _ = dk.shape
            dk = dk.reshape(b, k.shape[1], group, lk, -1).sum(2)
            dv = dv.reshape(b, k.shape[1], group, lk, -1).sum(2)
        return dq, dk, dv, None, None, None


def naive_attention(q, k, v, causal=False, scale=None, align="bottom_right"):
    """Apply :class:`AttentionFunction` (the naive path benchmarks compare against)."""
    return AttentionFunction.apply(q, k, v, causal, scale, align)
