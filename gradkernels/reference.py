"""Textbook PyTorch paths every kernel is checked and benchmarked against.

- :class:`LinearFunction` and :func:`linear`: ``act(x @ W^T + b)`` with a hand-written backward.
- :class:`AttentionFunction`: naive attention that saves the full B x H x Lq x Lk softmax matrix and
  backpropagates through the softmax Jacobian-vector product ``P * (dP - rowsum(P * dP))``.
- :func:`standard_attention`: plain composed torch ops; autograd records the graph.

They are also the ``"torch"`` backend of :mod:`gradkernels` (CPU tensors without the interpreter).
Attention here uses the library's causal convention: bottom-right aligned, query ``i`` sees keys
``j <= i + Lk - Lq``. Rows that see no key give output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def activation_fn(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``torch`` implementation of each activation :func:`gradkernels.linear` fuses."""
    if activation is None:
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


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
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
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


def _scores(q, k, causal, scale, align):
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], align=align, device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _softmax_rows(s):
    """Softmax over the last dim; rows with no visible key give zeros (not NaN)."""
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)))
    p = torch.where(finite, p, torch.zeros_like(p))
    return p, lse.squeeze(-1)


def standard_attention(q, k, v, causal=False, scale=None, return_lse=False, align="bottom_right"):
    """Composed torch ops: ``softmax(q k^T * scale) v``; autograd records the whole graph.

    Shapes as :func:`gradkernels.attention`: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_kv(q, k, v)
    p, lse = _softmax_rows(_scores(q, k, causal, scale, align))
    out = p @ v
    return (out, lse) if return_lse else out


class AttentionFunction(torch.autograd.Function):
    """Naive attention that saves the B x H x Lq x Lk softmax matrix P for backward.

    Backward: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(P * dP))``,
    ``dQ = dS K * scale``, ``dK = dS^T Q * scale`` (summed over each GQA group).
    """

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None, align="bottom_right"):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        ke, ve = _expand_kv(q, k, v)
        p, _ = _softmax_rows(_scores(q, ke, causal, scale, align))
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
