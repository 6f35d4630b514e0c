"""The kernels as ``torch.library`` custom ops: one opaque node per launch, for eager and compiled runs alike.

The autograd Functions of :mod:`gradkernels.autograd` call these ops in their forward and backward
(flash-attention's ``flash_attn_interface.py`` design), so the same ops run eagerly and under
``torch.compile``: Dynamo cannot trace into a Triton launch (least of all under the interpreter), but it
treats a custom op as one node whose output shapes come from its fake implementation. The ops carry no
autograd registration of their own; what to save and which gradients to compute is decided once, in
:mod:`gradkernels.autograd`.

Ops (namespace ``gradkernels``):

- ``linear_fwd(x, weight, bias, activation, store_pre) -> (out, pre)``
- ``linear_bwd(grad, x, weight, pre, activation, need_dx, need_dw, need_db) -> (dx, dw, db)``
- ``attention_fwd(q, k, v, causal_offset, scale) -> (out, lse, lse_lo)``
- ``attention_bwd(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale, need_dq, need_dk, need_dv)
  -> (dq, dk, dv)``
- ``attention_features_fwd(q, k, v, diag, scale, window_left, window_right, softcap, alibi_slopes, dropout_p,
  rng_state) -> (out, lse, lse_lo)`` and ``attention_features_bwd(grad_out, q, k, v, out, lse, lse_lo,
  <the same feature arguments>, need_dq, need_dk, need_dv) -> (dq, dk, dv)``: dense attention with a
  window, softcap, ALiBi or dropout (:mod:`gradkernels.ops.attention_features`).
- ``attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, <features>)
  -> (out, lse, lse_lo)`` and ``attention_varlen_bwd``: packed variable-length batches.

The plain ops never see a feature: a call without one keeps its route unchanged. The feature ops ask
:func:`gradkernels.ops.attention_features.features_supported_by_kernels` (the routing hook) whether the
launchers run the call (today: every feature call on the "triton" and "interpreter" backends); otherwise
the torch twins run inside the same ops.

Each op runs the launcher of :mod:`gradkernels.ops` on the ``"triton"`` and ``"interpreter"`` backends,
and the same-contract torch function of :mod:`gradkernels.reference` on the ``"torch"`` backend
(:func:`gradkernels.backend_for`). Their fake implementations give meta tensors and FakeTensors (shape
inference, ``torch.device("meta")`` models, ``torch.compile``) the real outputs' shapes and strides.

Custom op schemas cannot return ``None``: a tensor that is not produced is returned as an empty (0,)
tensor, and the caller, who asked for it or not, ignores it.

``torch.func.vmap``: each op has a batching rule. ``linear_fwd`` with only ``x`` batched folds the batch
into the rows (one launch); every other batched call runs the op once per batch element (correct, not
fused).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._device import backend_for
from .ops import attention as attention_ops
from .ops import attention_features
from .ops import linear as linear_ops

__all__ = ["linear_fwd", "linear_bwd", "attention_fwd", "attention_bwd", "attention_features_fwd",
           "attention_features_bwd", "attention_varlen_fwd", "attention_varlen_bwd"]


def _empty(like: Tensor) -> Tensor:
    """The stand-in for an output that is not produced (schemas cannot return None)."""
    return like.new_empty((0,))


def _impl(t: Tensor, ops_module):
    """The launchers' module for the kernel backends, :mod:`gradkernels.reference` for the torch one."""
    return reference if backend_for(t) == "torch" else ops_module


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("gradkernels::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], store_pre: bool
) -> tuple[Tensor, Tensor]:
    """``act(x @ weight^T + bias)`` for a 2-D ``x`` (M, K); ``pre`` is empty unless stored."""
    out, pre = _impl(x, linear_ops).linear_forward(x, weight, bias, activation, store_pre)
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
    pre: Optional[Tensor],
    activation: Optional[str],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`linear_fwd`; those not asked for are empty tensors.

    ``x`` is only read for dW and ``weight`` only for dX: either may be None when not needed. Without
    ``pre`` the incoming gradient is taken as the pre-activation's (no ``act'`` applied).
    """
    dx, dw, db = _impl(grad, linear_ops).linear_backward(
        grad, x, weight, pre, activation, need_dx, need_dw, need_db
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


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("gradkernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, causal_offset: Optional[int], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Flash forward: ``(out, lse, lse_lo)``; key j visible to query i iff ``j <= i + causal_offset``
    (None: all). ``lse_lo`` is the LSE's residual the backward needs (``ops.attention.split_lse``)."""
    return _impl(q, attention_ops).attention_forward(q, k, v, causal_offset, scale)


@attention_fwd.register_fake
def _(q, k, v, causal_offset, scale):
    # The launcher's own allocation helper, so the fake output has the real one's strides.
    out = attention_ops.empty_out(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=attention_ops.accumulator_dtype(q.dtype))
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
    dq, dk, dv = _impl(q, attention_ops).attention_backward(
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


# ----------------------------------------------------------------------------------------------------
# Attention with features (window, softcap, ALiBi, dropout) and varlen
# ----------------------------------------------------------------------------------------------------


def _features_impl(q: Tensor, features, varlen: bool):
    """The launchers where the kernels run the call (the routing hook says so), else the torch twins."""
    if backend_for(q) != "torch" and attention_features.features_supported_by_kernels(q, features, varlen=varlen):
        return attention_ops
    return reference


def _features(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state):
    return attention_features.Features(window_left, window_right, softcap, alibi_slopes, dropout_p,
                                       rng_state if dropout_p > 0 else None)


@torch.library.custom_op("gradkernels::attention_features_fwd", mutates_args=())
def attention_features_fwd(
    q: Tensor, k: Tensor, v: Tensor, diag: int, scale: float, window_left: int, window_right: int,
    softcap: float, alibi_slopes: Optional[Tensor], dropout_p: float, rng_state: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense attention with features: ``(out, lse, lse_lo)`` as :func:`attention_fwd` (semantics in
    :mod:`gradkernels.ops.attention_features`; ``diag`` the diagonal, ``Lk - Lq`` bottom-right)."""
    f = _features(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state)
    return _features_impl(q, f, False).attention_features_forward(q, k, v, diag, scale, f)


@attention_features_fwd.register_fake
def _(q, k, v, diag, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state):
    out = attention_ops.empty_out(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=attention_ops.accumulator_dtype(q.dtype))
    return out, lse, torch.empty_like(lse)


@torch.library.custom_op("gradkernels::attention_features_bwd", mutates_args=())
def attention_features_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_lo: Tensor, diag: int,
    scale: float, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
    dropout_p: float, rng_state: Optional[Tensor], need_dq: bool, need_dk: bool, need_dv: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_features_fwd`; those not asked for are empty tensors."""
    f = _features(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state)
    dq, dk, dv = _features_impl(q, f, False).attention_features_backward(
        grad_out, q, k, v, out, lse, lse_lo, diag, scale, f, need_dq=need_dq, need_dk=need_dk, need_dv=need_dv)
    return tuple(_empty(q) if t is None else t for t in (dq, dk, dv))


@attention_features_bwd.register_fake
def _(grad_out, q, k, v, out, lse, lse_lo, diag, scale, window_left, window_right, softcap, alibi_slopes, dropout_p,
      rng_state, need_dq, need_dk, need_dv):
    return (torch.empty_like(q) if need_dq else _empty(q), torch.empty_like(k) if need_dk else _empty(q),
            torch.empty_like(v) if need_dv else _empty(q))


@torch.library.custom_op("gradkernels::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, scale: float, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[Tensor], dropout_p: float, rng_state: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed variable-length attention: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
    int32 ``cu_seqlens_*`` (batch + 1); ``(out (total_q, Hq, Dv), lse (Hq, total_q), lse_lo)``, each
    sequence with its bottom-right diagonal."""
    f = _features(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state)
    return _features_impl(q, f, True).attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                               max_seqlen_k, scale, f)


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
      alibi_slopes, dropout_p, rng_state):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=attention_ops.accumulator_dtype(q.dtype))
    return out, lse, torch.empty_like(lse)


@torch.library.custom_op("gradkernels::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_lo: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor], dropout_p: float,
    rng_state: Optional[Tensor], need_dq: bool, need_dk: bool, need_dv: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_varlen_fwd`; those not asked for are empty tensors."""
    f = _features(window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state)
    dq, dk, dv = _features_impl(q, f, True).attention_varlen_backward(
        grad_out, q, k, v, out, lse, lse_lo, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, f,
        need_dq=need_dq, need_dk=need_dk, need_dv=need_dv)
    return tuple(_empty(q) if t is None else t for t in (dq, dk, dv))


@attention_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, lse_lo, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, need_dq, need_dk, need_dv):
    return (torch.empty_like(q) if need_dq else _empty(q), torch.empty_like(k) if need_dk else _empty(q),
            torch.empty_like(v) if need_dv else _empty(q))


# ----------------------------------------------------------------------------------------------------
# torch.func.vmap
# ----------------------------------------------------------------------------------------------------


def _vmap_by_loop(op):
    """Batching rule that runs ``op`` once per batch element and stacks the results (dim 0)."""

    def rule(info, in_dims, *args):
        results = []
        for i in range(info.batch_size):
            results.append(op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))))
        outs = tuple(torch.stack(column) for column in zip(*results))
        return outs, (0,) * len(outs)

    return rule


_linear_fwd_loop = _vmap_by_loop(linear_fwd)


def _linear_fwd_vmap(info, in_dims, x, weight, bias, activation, store_pre):
    x_dim, w_dim, b_dim = in_dims[:3]
    if x_dim is None or w_dim is not None or b_dim is not None:
        return _linear_fwd_loop(info, in_dims, x, weight, bias, activation, store_pre)
    # Only x is batched, (N, M, K) once moved: the batch is more rows of one matmul.
    xb = x.movedim(x_dim, 0)
    n, m = xb.shape[0], xb.shape[1]
    out, pre = linear_fwd(xb.reshape(n * m, xb.shape[2]), weight, bias, activation, store_pre)
    pre = pre.view(n, m, -1) if (store_pre and activation is not None) else pre.new_empty((n, 0))
    return (out.view(n, m, -1), pre), (0, 0)


if hasattr(torch.library, "register_vmap"):  # torch >= 2.5
    torch.library.register_vmap(linear_fwd, _linear_fwd_vmap)
    for _op in (linear_bwd, attention_fwd, attention_bwd, attention_features_fwd, attention_features_bwd,
                attention_varlen_fwd, attention_varlen_bwd):
        torch.library.register_vmap(_op, _vmap_by_loop(_op))
