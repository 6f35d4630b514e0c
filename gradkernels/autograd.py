"""The one autograd route of gradkernels: ``torch.autograd.Function``s whose forward and backward call the
custom ops of :mod:`gradkernels.custom_ops`, eager and compiled alike, on every backend.

Route: :func:`gradkernels.linear` -> :func:`linear` -> :class:`LinearFunction` -> ``gradkernels::linear_fwd``
(``linear_bwd`` in backward) -> the launcher of :mod:`gradkernels.ops` (kernel backends) or its torch
twin in :mod:`gradkernels.reference` (torch backend). Attention the same way. What to save, when to keep
the pre-activation and which gradients to compute is written once, here.

Why this design. Two single-route designs were tried side by side (prototypes on torch 2.13, CPU):

- custom ops with ``register_autograd``, called directly in eager mode too: double backward works when
  the registered backward is made of differentiable ops, and ``torch.compile`` traces it; but
  ``torch.func.grad`` fails ("must override the setup_context staticmethod": the autograd.Function torch
  generates for a custom op has none) and ``torch.func.jvp`` returns a **silently wrong** tangent.
- ``autograd.Function``s with ``setup_context`` calling the custom ops (flash-attention's
  ``flash_attn_interface.py``): ``torch.func.grad`` / ``vjp`` / ``jacrev`` work, ``generate_vmap_rule``
  plus a batching rule on each op gives ``vmap``, forward-mode AD fails loudly (no ``jvp``: Dynamo
  refuses Functions that define one), double backward works, ``torch.compile(fullgraph=True)`` traces
  the Function into one graph with the custom ops as opaque nodes, and meta tensors / FakeTensors take
  the ops' fake implementations.

Chosen: the second, the only one that meets every requirement, and no more code (the ops lose their
autograd registration, the Functions keep theirs). Eager overhead, measured with the launches stubbed
out on the 2-core development CPU: both designs pay a custom-op dispatch per launch, which dominates;
torch's ``apply`` of a ``setup_context`` Function adds an ``inspect.signature`` call per call, so outside
torch.func and Dynamo the same forward/setup_context/backward run through an old-style twin
(:func:`_plain_autograd_twin`), and a call autograd cannot differentiate skips the Function.

Rules that hold on every backend:

- Forward saves x only when dW is needed, W only when dX is needed, and the pre-activation only with an
  activation when a gradient is needed (``store_pre``, decided by :func:`linear` from ``requires_grad``
  and grad mode, since a ``setup_context`` forward cannot see ``needs_input_grad``; always under
  torch.func transforms, where ``requires_grad`` sees one level only). Attention saves q, k, v, out and
  the LSE. A call autograd cannot differentiate runs the Function's forward alone.
- Backward without ``create_graph`` (the training case): the fused kernel backward, only the gradients
  ``needs_input_grad`` asks for.
- Backward with ``create_graph=True`` (and always under ``torch.func.grad``, which builds graphs):
  linear's backward is expressed through differentiable operations, :func:`linear` itself for dX and dW
  and torch's own activation backward op for ``dY * act'(pre)``
  (:func:`gradkernels.reference.activation_backward`), so a second backward differentiates it exactly as
  torch does. The saved pre-activation is an output of :class:`LinearFunction`, so the second backward
  reaches x, W and b through it (its gradient arrives as ``grad_pre``). Attention's kernel gradients are
  wrapped in :class:`AttentionBackwardFunction`, whose own backward (the double backward) recomputes
  attention by composed torch ops and differentiates that: exact, but it holds the Lq x Lk scores of
  every head in that pass.
- Under ``torch.compile`` (which has no double backward) the pre-activation is non-differentiable and
  the compiled backward is the fused one.
- Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) raises a
  ``NotImplementedError`` naming the alternative.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD

from . import custom_ops, reference

__all__ = ["LinearFunction", "AttentionFunction", "AttentionBackwardFunction", "AttentionFeaturesFunction",
           "AttentionFeaturesBackwardFunction", "FeatureSpec", "linear", "attention", "attention_features"]


def _flatten(t):
    """(..., K) -> (M, K); explicit M so that K == 0 is not ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _undefined_grads_as_none(ctx):
    # Outputs nobody used (the pre-activation, the LSE) reach backward as None, not as allocated zeros.
    # Dynamo cannot trace set_materialize_grads; compiled graphs never see those gradients anyway.
    if not torch.compiler.is_compiling():
        ctx.set_materialize_grads(False)


def _plain_autograd_twin(fn_cls):
    """``fn_cls`` as an old-style Function: the same forward, setup_context and backward, called through
    ``forward(ctx, ...)``.

    torch's ``apply`` of a Function that defines ``setup_context`` binds its arguments with
    ``inspect.signature`` on every call (about 10x the cost of the old-style ``apply``, measured); that
    form is needed only by torch.func transforms and Dynamo. :func:`_apply` uses this twin otherwise.
    """

    def forward(ctx, *args):
        output = fn_cls.forward(*args)
        fn_cls.setup_context(ctx, args, output)
        return output

    name = f"{fn_cls.__name__}Eager"
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                     "backward": staticmethod(fn_cls.backward),
                                                     "__doc__": fn_cls.__doc__, "__module__": __name__})


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _autograd_needed(*tensors):
    """Whether autograd may differentiate through a call on ``tensors``.

    Under torch.func transforms ``requires_grad`` describes the innermost level only (an outer
    ``grad``/``jacrev`` may still track the call): always yes there.
    """
    if not torch.compiler.is_compiling() and _transforms_active():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _apply(fn_cls, twin, needed, *args):
    """``fn_cls.apply(*args)``; its forward alone when autograd has nothing to record (``needed`` False):
    the same custom op, without the Function's bookkeeping."""
    if not needed:
        return fn_cls.forward(*args)
    if torch.compiler.is_compiling() or _transforms_active():
        return fn_cls.apply(*args)
    return twin.apply(*args)


def _reject_forward_ad(name, alternative, *tensors):
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"gradkernels.{name} does not support forward-mode AD (torch.func.jvp, jacfwd, "
                f"torch.autograd.forward_ad): use {alternative} there. Reverse mode (backward, torch.func.grad, "
                "vjp, jacrev) and vmap are supported."
            )


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


class LinearFunction(torch.autograd.Function):
    """``(act(x @ W^T + b), pre)`` through ``gradkernels::linear_fwd``; ``pre`` (M, N) when stored.

    Use :func:`linear`, which decides ``store_pre`` and returns the output only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, activation, store_pre):
        out, pre = custom_ops.linear_fwd(_flatten(x), weight, bias, activation, store_pre)
        return out.view(*x.shape[:-1], weight.shape[0]), pre

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, store_pre = inputs
        _, pre = output
        need_dx, need_dw, _ = ctx.needs_input_grad[:3]
        has_pre = activation is not None and store_pre
        ctx.save_for_backward(x if need_dw else None, weight if need_dx else None, pre if has_pre else None)
        ctx.activation, ctx.has_pre, ctx.x_shape = activation, has_pre, x.shape
        ctx.pre_differentiable = has_pre and not torch.compiler.is_compiling()
        if not ctx.pre_differentiable:
            ctx.mark_non_differentiable(pre)
        _undefined_grads_as_none(ctx)

    @staticmethod
    def backward(ctx, grad_out, grad_pre):
        x, weight, pre = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        activation = ctx.activation
        if activation is not None and not ctx.has_pre:
            raise RuntimeError("LinearFunction: backward without the pre-activation (call it through linear())")
        grad_pre = grad_pre if ctx.pre_differentiable else None
        if grad_out is None and grad_pre is None:
            return None, None, None, None, None
        m = math.prod(ctx.x_shape[:-1])  # explicit: no reshape(-1, 0) ambiguity with empty dims
        grad2 = None if grad_out is None else grad_out.reshape(m, grad_out.shape[-1])
        if grad_pre is not None:
            # The pre-activation's own gradient, which only a double backward produces: dL/dpre in full.
            if grad2 is not None:
                grad_pre = reference.activation_backward(grad2, pre, activation) + grad_pre
            grad2, pre, activation = grad_pre, None, None
        x2 = None if x is None else _flatten(x)
        if torch.is_grad_enabled():
            dx, dw, db = _linear_backward_differentiable(grad2, x2, weight, pre, activation, need_dx, need_dw,
                                                         need_db)
        else:
            dx, dw, db = custom_ops.linear_bwd(grad2, x2, weight, pre, activation, need_dx, need_dw, need_db)
        return (dx.view(ctx.x_shape) if need_dx else None), (dw if need_dw else None), (db if need_db else None), \
            None, None


def _linear_backward_differentiable(grad2, x2, weight, pre, activation, need_dx, need_dw, need_db):
    """The backward as differentiable operations (for ``create_graph=True``): our linear for the two
    products, torch's activation backward op for ``dY' = dY * act'(pre)``."""
    g = grad2 if pre is None else reference.activation_backward(grad2, pre, activation)
    dx = linear(g, weight.t()) if need_dx else None  # dY' W
    dw = linear(g.t(), x2.t()) if need_dw else None  # dY'^T X
    db = g.sum(0) if need_db else None
    return dx, dw, db


_LinearEager = _plain_autograd_twin(LinearFunction)


def linear(x, weight, bias=None, activation=None):
    """``act(x @ weight^T + bias)`` through :class:`LinearFunction` (arguments already validated).

    The pre-activation is kept only when an activation is given and autograd will need it.
    """
    _reject_forward_ad("linear", "torch.nn.functional.linear (or gradkernels.reference.linear)", x, weight, bias)
    needed = _autograd_needed(x, weight, bias)
    out, _ = _apply(LinearFunction, _LinearEager, needed, x, weight, bias, activation,
                    activation is not None and needed)  # store_pre
    return out


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


class AttentionFunction(torch.autograd.Function):
    """Flash-style attention through ``gradkernels::attention_fwd``; returns ``(out, lse)``.

    Saves q, k, v, out and the per-row statistics the forward returns after ``out`` (the LSE) only, no
    Lq x Lk tensor; the backward recomputes P from them and hands the statistics back as they came.
    They are non-differentiable: gradients flow through ``out`` only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, causal_offset, scale):
        return custom_ops.attention_fwd(q, k, v, causal_offset, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal_offset, scale = inputs
        out, *stats = output
        ctx.save_for_backward(q, k, v, out, *stats)
        ctx.causal_offset, ctx.scale = causal_offset, scale
        ctx.mark_non_differentiable(*stats)
        _undefined_grads_as_none(ctx)

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        q, k, v, out, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_out is None or not any(needs):
            return None, None, None, None, None
        if torch.is_grad_enabled():
            # create_graph=True or torch.func.grad: the same kernel gradients, recorded so that a second
            # backward can go through them (out is a function of q, k, v: a constant there).
            grads = AttentionBackwardFunction.apply(grad_out, q, k, v, out.detach(), ctx.causal_offset, ctx.scale,
                                                    *needs, *stats)
        else:
            grads = custom_ops.attention_bwd(grad_out, q, k, v, out, *stats, ctx.causal_offset, ctx.scale, *needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None)


class AttentionBackwardFunction(torch.autograd.Function):
    """The kernels' ``(dq, dk, dv)`` as a differentiable function of ``(grad_out, q, k, v)``.

    Its backward is attention's double backward: it recomputes attention with composed torch ops
    (:func:`gradkernels.reference.attention_with_offset`) and differentiates that twice with
    ``torch.func.vjp``, which holds the (B, Hq, Lq, Lk) scores during that pass. ``out`` and the saved
    per-row statistics (``*stats``) enter as constants.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, q, k, v, out, causal_offset, scale, need_dq, need_dk, need_dv, *stats):
        return custom_ops.attention_bwd(grad_out, q, k, v, out, *stats, causal_offset, scale, need_dq, need_dk,
                                        need_dv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, q, k, v, _, causal_offset, scale, *rest = inputs
        ctx.save_for_backward(grad_out, q, k, v)
        ctx.causal_offset, ctx.scale, ctx.needs, ctx.n_stats = causal_offset, scale, rest[:3], len(rest) - 3
        ctx.mark_non_differentiable(*(g for g, need in zip(output, ctx.needs) if not need))
        _undefined_grads_as_none(ctx)

    @staticmethod
    def backward(ctx, grad_dq, grad_dk, grad_dv):
        grad_out, q, k, v = ctx.saved_tensors
        offset, scale = ctx.causal_offset, ctx.scale
        cotangents = tuple(
            g if (g is not None and need) else torch.zeros_like(t)
            for g, t, need in zip((grad_dq, grad_dk, grad_dv), (q, k, v), ctx.needs)
        )

        def first_order(grad_out, q, k, v):
            _, vjp = torch.func.vjp(lambda q, k, v: reference.attention_with_offset(q, k, v, offset, scale)[0],
                                    q, k, v)
            return vjp(grad_out)

        _, vjp = torch.func.vjp(first_order, grad_out, q, k, v)
        return (*vjp(cotangents), None, None, None, None, None, None) + (None,) * ctx.n_stats


_AttentionEager = _plain_autograd_twin(AttentionFunction)


def attention(q, k, v, causal_offset, scale):
    """``(out, lse)`` through :class:`AttentionFunction` (arguments already validated).

    Args:
        q: (B, Hq, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv).
        causal_offset: None (no mask) or int: key j is visible to query i iff ``j <= i + causal_offset``
            (``Lk - Lq`` for the library's bottom-right causal, 0 for torch's top-left ``is_causal``).
        scale: the softmax scale (a float).

    Returns:
        ``(out, lse)``: (B, Hq, Lq, Dv) in q's dtype, and the (B, Hq, Lq) log-sum-exp (fp32; fp64 for fp64
        inputs), not differentiable.
    """
    _reject_forward_ad("attention", "gradkernels.reference.standard_attention (or torch's SDPA)", q, k, v)
    out, lse, *_ = _apply(AttentionFunction, _AttentionEager, _autograd_needed(q, k, v), q, k, v, causal_offset,
                          float(scale))
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Attention with features (window, softcap, ALiBi, dropout) and varlen
# ----------------------------------------------------------------------------------------------------


class FeatureSpec(NamedTuple):
    """The Python scalars of a features call (one argument of the Functions, not ten).

    ``diag``: the dense call's diagonal (``Lk - Lq`` bottom-right, 0 top-left); None for varlen, whose
    diagonal is each sequence's bottom-right one. ``max_seqlen_q/k``: varlen only (None for dense).
    Window ``(-1, -1)`` is unbounded, ``right = 0`` causal; ``softcap`` and ``dropout_p`` 0 are off.
    """

    diag: Optional[int]
    scale: float
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None


def _features_fwd(q, k, v, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec):
    f = (spec.scale, spec.window_left, spec.window_right, spec.softcap, alibi_slopes, spec.dropout_p, rng_state)
    if cu_seqlens_q is None:
        return custom_ops.attention_features_fwd(q, k, v, spec.diag, *f)
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    return custom_ops.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, spec.max_seqlen_q, spec.max_seqlen_k,
                                           *f)


def _features_bwd(grad_out, q, k, v, out, stats, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec, needs):
    f = (spec.scale, spec.window_left, spec.window_right, spec.softcap, alibi_slopes, spec.dropout_p, rng_state)
    if cu_seqlens_q is None:
        return custom_ops.attention_features_bwd(grad_out, q, k, v, out, *stats, spec.diag, *f, *needs)
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    return custom_ops.attention_varlen_bwd(grad_out, q, k, v, out, *stats, cu_seqlens_q, cu_seqlens_k,
                                           spec.max_seqlen_q, spec.max_seqlen_k, *f, *needs)


def _features_of(spec, alibi_slopes, rng_state):
    from .ops.attention_features import Features

    return Features(spec.window_left, spec.window_right, spec.softcap, alibi_slopes, spec.dropout_p,
                    rng_state if spec.dropout_p > 0 else None)


class AttentionFeaturesFunction(torch.autograd.Function):
    """Attention with features, dense (``cu_seqlens_q`` None) or varlen, through
    ``gradkernels::attention_features_fwd`` / ``attention_varlen_fwd``; returns ``(out, lse, lse_lo)``.

    The same rules as :class:`AttentionFunction`: saves q, k, v, out and the per-row statistics (plus the
    ALiBi slopes, the dropout ``rng_state`` and the sequence offsets, which are inputs): never a mask or
    an Lq x Lk tensor; the backward regenerates the dropout mask from ``rng_state``. Gradients flow to
    q, k and v only (not to the slopes).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec):
        return _features_fwd(q, k, v, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec = inputs
        out, *stats = output
        ctx.save_for_backward(q, k, v, out, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, *stats)
        ctx.spec = spec
        ctx.mark_non_differentiable(*stats)
        _undefined_grads_as_none(ctx)

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        q, k, v, out, alibi_slopes, rng_state, cu_q, cu_k, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_out is None or not any(needs):
            return (None,) * 8
        if torch.is_grad_enabled():
            grads = AttentionFeaturesBackwardFunction.apply(grad_out, q, k, v, out.detach(), alibi_slopes, rng_state,
                                                            cu_q, cu_k, ctx.spec, *needs, *stats)
        else:
            grads = _features_bwd(grad_out, q, k, v, out, stats, alibi_slopes, rng_state, cu_q, cu_k, ctx.spec, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


class AttentionFeaturesBackwardFunction(torch.autograd.Function):
    """The kernels' (or twins') ``(dq, dk, dv)`` of a features call as a differentiable function of
    ``(grad_out, q, k, v)``; its backward (the double backward) recomputes attention with composed torch
    ops (:func:`gradkernels.reference.attention_features` / ``attention_varlen``, the same dropout mask
    regenerated) and differentiates that twice, holding the Lq x Lk scores in that pass, as the plain
    :class:`AttentionBackwardFunction` does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, q, k, v, out, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec, need_dq, need_dk,
                need_dv, *stats):
        return _features_bwd(grad_out, q, k, v, out, stats, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k,
                             spec, (need_dq, need_dk, need_dv))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, q, k, v, _, alibi_slopes, rng_state, cu_q, cu_k, spec, *rest = inputs
        ctx.save_for_backward(grad_out, q, k, v, alibi_slopes, rng_state, cu_q, cu_k)
        ctx.spec, ctx.needs, ctx.n_stats = spec, rest[:3], len(rest) - 3
        ctx.mark_non_differentiable(*(g for g, need in zip(output, ctx.needs) if not need))
        _undefined_grads_as_none(ctx)

    @staticmethod
    def backward(ctx, grad_dq, grad_dk, grad_dv):
        grad_out, q, k, v, alibi_slopes, rng_state, cu_q, cu_k = ctx.saved_tensors
        spec = ctx.spec
        features = _features_of(spec, alibi_slopes, rng_state)
        cotangents = tuple(
            g if (g is not None and need) else torch.zeros_like(t)
            for g, t, need in zip((grad_dq, grad_dk, grad_dv), (q, k, v), ctx.needs)
        )

        def composed(q, k, v):
            if cu_q is None:
                return reference.attention_features(q, k, v, spec.diag, spec.scale, features)[0]
            return reference.attention_varlen(q, k, v, cu_q, cu_q if cu_k is None else cu_k, spec.scale, features)[0]

        def first_order(grad_out, q, k, v):
            _, vjp = torch.func.vjp(composed, q, k, v)
            return vjp(grad_out)

        _, vjp = torch.func.vjp(first_order, grad_out, q, k, v)
        return (*vjp(cotangents),) + (None,) * (9 + ctx.n_stats)


_AttentionFeaturesEager = _plain_autograd_twin(AttentionFeaturesFunction)


def attention_features(q, k, v, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec):
    """``(out, lse)`` of a features call through :class:`AttentionFeaturesFunction` (arguments already
    validated): dense with ``cu_seqlens_q`` None, else varlen. See :class:`FeatureSpec`."""
    _reject_forward_ad("attention", "gradkernels.reference.attention_features (or torch's SDPA)", q, k, v)
    if cu_seqlens_k is cu_seqlens_q:  # self-attention offsets: one tensor (Dynamo refuses an input given twice)
        cu_seqlens_k = None
    out, lse, *_ = _apply(AttentionFeaturesFunction, _AttentionFeaturesEager, _autograd_needed(q, k, v), q, k, v,
                          alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec)
    return out, lse
