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

Custom op schemas cannot return ``None``: a tensor that is not produced is returned as an empty
(numel 0) tensor and mapped back to ``None`` here.

Public entry points with the semantics of :func:`gradkernels.linear` (checked arguments, any leading
dims): :func:`linear`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import linear as linear_ops

__all__ = ["linear"]


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
    """:func:`gradkernels.linear` through the custom ops (what the functional API calls when compiling).

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
