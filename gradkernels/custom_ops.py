"""The kernels as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` can trace through them.

Eager calls go through the ``torch.autograd.Function`` classes of :mod:`gradkernels.autograd`. Under
``torch.compile`` the functional API calls the ops defined here instead: Dynamo cannot trace into a
Triton launch (least of all under the interpreter), but it treats a custom op as one opaque node whose
output shapes come from its fake (meta) implementation, and AOTAutograd takes its backward from the
autograd registration. Forward and backward are separate ops that call the same launchers in
:mod:`gradkernels.ops` as the autograd Functions, so the kernel logic has one source of truth.

Ops (namespace ``gradkernels``):

- ``linear_fwd(x, weight, bias, activation, store_pre) -> (out, pre)``
- ``linear_bwd(grad, x, weight, pre, activation, need_dx, need_dw, need_db) -> (dx, dw, db)``
- ``attention_fwd(q, k, v, causal_offset, scale) -> (out, lse, lse_lo)``
- ``attention_bwd(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale, need_dq, need_dk, need_dv)
  -> (dq, dk, dv)``

Custom op schemas cannot return ``None``: a tensor that is not produced is returned as an empty
(numel 0) tensor and mapped back to ``None`` here.

Public entry points, drop-in replacements for the autograd Functions' ``apply`` (same arguments, same
results) that ``gradkernels.functional`` calls when ``torch.compiler.is_compiling()``:
:func:`linear` for ``LinearFunction.apply`` and :func:`attention` for ``AttentionFunction.apply``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import attention as attention_ops
from .ops import linear as linear_ops

__all__ = ["linear", "attention"]


def _empty(like: Tensor) -> Tensor:
    """The stand-in for an output that is not produced (schemas cannot return None)."""
    return like.new_empty((0,))


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("gradkernels::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], store_pre: bool
) -> tuple[Tensor, Tensor]:
    """``act(x @ weight^T + bias)`` for a 2-D ``x`` (M, K); ``pre`` is empty unless stored."""
    out, pre = linear_ops.linear_forward(x, weight, bias, activation, store_pre)
    return out, (_empty(x) if pre is None else pre)


@linear_fwd.register_fake
def _(x, weight, bias, activation, store_pre):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    pre = out.new_empty(out.shape) if (store_pre and activation is not None) else _empty(x)
    return out, pre


@torch.library.custom_op("gradkernels::linear_bwd", mutates_args=())
def linear_bwd(
    grad: Tensor,
    x: Optional[Tensor],
    weight: Optional[Tensor],
    pre: Tensor,
    activation: Optional[str],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`linear_fwd`; those not asked for are empty tensors.

    ``x`` is only read for dW and ``weight`` only for dX: either may be None when not needed.
    """
    dx, dw, db = linear_ops.linear_backward(
        grad, x, weight, _or_none(pre), activation, need_dx, need_dw, need_db
    )
    return tuple(_empty(grad) if t is None else t for t in (dx, dw, db))


@linear_bwd.register_fake
def _(grad, x, weight, pre, activation, need_dx, need_dw, need_db):
    m, n = grad.shape
    k = x.shape[1] if x is not None else (weight.shape[1] if weight is not None else 0)
    dx = grad.new_empty((m, k)) if need_dx else _empty(grad)
    dw = grad.new_empty((n, k)) if need_dw else _empty(grad)
    db = grad.new_empty((n,)) if need_db else _empty(grad)
    return dx, dw, db


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    _, pre = output
    need_dx, need_dw, _ = ctx.needs_input_grad[:3]
    if activation is not None and pre.numel() == 0:
        # Called with store_pre=False but a gradient is wanted: backward recomputes the pre-activation
        # from x, weight and bias rather than silently dropping act'(pre).
        ctx.save_for_backward(x, weight, bias, pre)
    else:
        ctx.save_for_backward(x if need_dw else None, weight if need_dx else None, None, pre)
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out, grad_pre):
    x, weight, bias, pre = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    if not (need_dx or need_dw or need_db):
        return None, None, None, None, None
    if ctx.activation is not None and pre.numel() == 0:
        pre, _ = linear_fwd(x, weight, bias, None, False)
    dx, dw, db = linear_bwd(grad_out, x, weight, pre, ctx.activation, need_dx, need_dw, need_db)
    return (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None), None, None


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """``LinearFunction.apply`` through the custom ops (what the functional API calls when compiling).

    The caller (``gradkernels.functional.linear``) has already validated the arguments and applied
    autocast; this only flattens the leading dims, as ``LinearFunction`` does.

    Args:
        x: (..., in_features). weight: (out_features, in_features). bias: (out_features,) or None.
        activation: None, "relu", "gelu", "gelu_tanh" or "silu".

    Returns:
        (..., out_features) tensor in the dtype of ``x``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    # Pre-activation only when autograd will need it (the Function's rule).
    store_pre = activation is not None and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    out, _ = linear_fwd(x2, weight, bias, activation, store_pre)
    return out.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("gradkernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, causal_offset: Optional[int], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Flash forward: ``(out, lse, lse_lo)``; key j visible to query i iff ``j <= i + causal_offset``."""
    return attention_ops.attention_forward(q, k, v, causal_offset, scale)


@attention_fwd.register_fake
def _(q, k, v, causal_offset, scale):
    # The launcher's own allocation helper, so the fake output has the real one's strides.
    out = attention_ops._empty_out(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=attention_ops.lse_dtype(q.dtype))
    return out, lse, torch.empty_like(lse)


@torch.library.custom_op("gradkernels::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    lse_lo: Tensor,
    causal_offset: Optional[int],
    scale: float,
    need_dq: bool,
    need_dk: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_fwd`; those not asked for are empty tensors."""
    dq, dk, dv = attention_ops.attention_backward(
        grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale,
        need_dq=need_dq, need_dk=need_dk, need_dv=need_dv,
    )
    return tuple(_empty(q) if t is None else t for t in (dq, dk, dv))


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale, need_dq, need_dk, need_dv):
    return (
        torch.empty_like(q) if need_dq else _empty(q),
        torch.empty_like(k) if need_dk else _empty(q),
        torch.empty_like(v) if need_dv else _empty(q),
    )


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal_offset, scale = inputs
    out, lse, lse_lo = output
    ctx.save_for_backward(q, k, v, out, lse, lse_lo)
    ctx.causal_offset, ctx.scale = causal_offset, scale
    # As AttentionFunction: the LSE is an output for merging partial results, not differentiable.
    ctx.mark_non_differentiable(lse, lse_lo)


def _attention_backward(ctx, grad_out, _grad_lse, _grad_lse_lo):
    q, k, v, out, lse, lse_lo = ctx.saved_tensors
    need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
    if not (need_dq or need_dk or need_dv):
        return None, None, None, None, None
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, lse_lo, ctx.causal_offset, ctx.scale,
                               need_dq, need_dk, need_dv)
    return (dq if need_dq else None), (dk if need_dk else None), (dv if need_dv else None), None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, causal_offset: Optional[int], scale: float) -> tuple[Tensor, Tensor]:
    """``AttentionFunction.apply`` through the custom ops (what the functional API calls when compiling).

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). Validated (and autocast) by the caller.
        causal_offset: None (no mask) or int: key j is visible to query i iff ``j <= i + causal_offset``
            (``Lk - Lq`` for the library's bottom-right causal, 0 for torch's top-left ``is_causal``).
        scale: the softmax scale (a float).

    Returns:
        ``(out, lse)``: (B, Hq, Lq, Dv) in q's dtype, and the (B, Hq, Lq) log-sum-exp (fp32; fp64 for fp64
        inputs), not differentiable.
    """
    out, lse, _ = attention_fwd(q, k, v, causal_offset, float(scale))
    return out, lse
