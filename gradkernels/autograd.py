"""``torch.autograd.Function`` classes over the launchers in :mod:`gradkernels.ops`.

Each saves only what its backward needs and skips the gradients nobody asked for.
"""

from __future__ import annotations

import math

import torch

from .ops import attention as attention_ops
from .ops import linear as linear_ops

_custom_fwd = torch.amp.custom_fwd(device_type="cuda")
_custom_bwd = torch.amp.custom_bwd(device_type="cuda")


def _flatten(t):
    """(..., K) -> (M, K); explicit M so that K == 0 is not ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class LinearFunction(torch.autograd.Function):
    """``act(x @ W^T + b)`` through the fused Triton kernels."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, x, weight, bias, activation):
        x2 = _flatten(x)  # a view whenever the strides allow
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        store_pre = activation is not None and (need_dx or need_dw or need_db)
        out, pre = linear_ops.linear_forward(x2, weight, bias, activation, store_pre)
        ctx.save_for_backward(x2 if need_dw else None, weight if need_dx else None, pre)
        ctx.activation, ctx.x_shape = activation, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out):
        x2, weight, pre = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = linear_ops.linear_backward(
            _flatten(grad_out), x2, weight, pre, ctx.activation, need_dx, need_dw, need_db
        )
        return (None if dx is None else dx.view(ctx.x_shape)), dw, db, None


class AttentionFunction(torch.autograd.Function):
    """Flash-style attention through the Triton kernels; returns ``(out, lse)``.

    Saves q, k, v, out and the LSE only (no Lq x Lk tensor); the backward recomputes P from them.
    ``lse`` is marked non-differentiable: gradients flow through ``out`` only.
    """

    @staticmethod
    @_custom_fwd
    def forward(ctx, q, k, v, causal_offset, scale):
        out, lse, lse_lo = attention_ops.attention_forward(q, k, v, causal_offset, scale)
        ctx.save_for_backward(q, k, v, out, lse, lse_lo)
        ctx.causal_offset, ctx.scale = causal_offset, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, lse_lo = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        dq, dk, dv = attention_ops.attention_backward(
            grad_out, q, k, v, out, lse, lse_lo, ctx.causal_offset, ctx.scale,
            need_dq=need_dq, need_dk=need_dk, need_dv=need_dv,
        )
        return dq, dk, dv, None, None
