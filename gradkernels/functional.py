"""Functional API: :func:`linear`, :func:`attention`, :func:`scaled_dot_product_attention`."""

from __future__ import annotations

import logging
import numbers

import torch

from . import autograd
from ._device import autocast_inputs, backend_for
from .ops import attention as attention_ops
from .ops.common import FLOAT_DTYPES
from .ops.linear import check_linear_args


def linear(x, weight, bias=None, activation=None):
    """``act(x @ weight^T + bias)`` with bias and activation fused into the matmul.

    Same result as ``act(torch.nn.functional.linear(x, weight, bias))``.

    Args:
        x: (..., in_features) tensor; any leading dims, any strides.
        weight: (out_features, in_features), the layout of ``torch.nn.Linear``.
        bias: (out_features,) or None.
        activation: None, "relu", "gelu" (erf, like ``nn.GELU()``), "gelu_tanh" or "silu".

    Returns:
        (..., out_features) tensor in the input dtype (the autocast dtype under ``torch.autocast``).

    Raises:
        TypeError: a non-tensor, an integer tensor, or mixed dtypes (outside autocast).
        ValueError: shapes that do not fit, tensors on different devices, an unknown activation.
    """
    check_linear_args(x, weight, bias, activation, same_dtype=False)
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
    check_linear_args(x, weight, bias, activation)
    return autograd.linear(x, weight, bias, activation)


_log = logging.getLogger("gradkernels")


def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Flash-style attention ``softmax(q k^T * scale) v``, forward and backward in Triton kernels.

    No (Lq x Lk) tensor is stored or allocated: the forward keeps the log-sum-exp of each row and the
    backward recomputes the softmax from it.

    Args:
        q: (B, Hq, Lq, D) queries. k: (B, Hkv, Lk, D) keys. v: (B, Hkv, Lk, Dv) values. Any strides
            (a (B, L, H, D) tensor transposed to (B, H, L, D) is read in place); Hq a multiple of Hkv
            (grouped-query attention; Hkv = 1 is multi-query); D, Dv <= 256; one floating dtype.
        causal: mask keys after the query, bottom-right aligned: query i sees keys
            ``j <= i + Lk - Lq`` (FlashAttention >= 2.1; the last query sees every key, as with a KV
            cache). With Lq > Lk the first ``Lq - Lk`` rows see no key: their output is 0, their LSE
            ``-inf`` and their gradients 0. (torch's ``is_causal`` is top-left aligned: use
            :func:`scaled_dot_product_attention` for that.)
        scale: softmax scale; ``1 / sqrt(D)`` when None.
        return_lse: also return the natural-log log-sum-exp of each row's scaled scores, so partial
            results over key chunks can be merged exactly. It is not differentiable (no gradient
            flows back through it).

    Returns:
        ``out`` (B, Hq, Lq, Dv) in the input dtype (the autocast dtype under ``torch.autocast``), and
        with ``return_lse=True`` also ``lse`` (B, Hq, Lq), fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: a non-tensor, an integer tensor, mixed dtypes (outside autocast), a non-bool
            ``causal`` or a non-numeric ``scale``.
        ValueError: not 4-D, mismatched batch, heads, lengths or head dims, Hq not a multiple of Hkv,
            a head dim over 256, tensors on different devices, a non-finite ``scale``.
    """
    attention_ops.check_attention_args(q, k, v, scale, same_dtype=False)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    q, k, v = autocast_inputs(q.device.type, q, k, v)
    attention_ops.check_attention_args(q, k, v, scale)
    scale = attention_ops.default_scale(q.shape[-1]) if scale is None else float(scale)
    offset = k.shape[2] - q.shape[2] if causal else None
    out, lse = autograd.attention(q, k, v, offset, scale)
    return (out, lse) if return_lse else out


def _sdpa_handover_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Why a ``scaled_dot_product_attention`` call goes to torch, or None when the kernels cover it."""
    if attn_mask is not None:
        return "attn_mask is given"
    if not isinstance(dropout_p, numbers.Real) or dropout_p != 0.0:
        return "dropout_p is not 0"
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "an input is not a tensor"
    if any(t.is_nested for t in (query, key, value)):
        return "nested tensors"
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "is_causal or enable_gqa is not a bool"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        return "scale is not a real number"
    if not query.dim() == key.dim() == value.dim() or query.dim() < 2:
        return "inputs of different or fewer than 2 dims"
    if query.shape[:-3] != key.shape[:-3] or query.shape[:-3] != value.shape[:-3]:
        return "batch dims differ (broadcasting)"
    if query.dim() >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv or (hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0)):
            return "head counts need broadcasting or differ without enable_gqa"
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        return "mismatched head dims or key/value lengths"
    if query.shape[-1] > attention_ops.MAX_HEAD_DIM or value.shape[-1] > attention_ops.MAX_HEAD_DIM:
        return f"a head dim over {attention_ops.MAX_HEAD_DIM}"
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return "an empty input"
    if key.device != query.device or value.device != query.device:
        return "inputs on different devices"
    q, k, v = autocast_inputs(query.device.type, query, key, value)
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return "dtypes differ or are not floating point"
    if backend_for(q) == "torch" and q.device.type != "meta":  # meta: the kernels' shapes and layout
        return f"no Triton kernel for {q.dtype} on {q.device.type}"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature and semantics.

    Calls without a mask and without dropout run on the Triton kernels: query (..., Hq, L, E),
    key (..., H, S, E), value (..., H, S, Ev) with the same leading dims, H == Hq (or Hq a multiple
    of H with ``enable_gqa=True``), E, Ev <= 256. ``is_causal`` is torch's top-left alignment (query i
    sees keys ``j <= i``). Under ``torch.autocast`` the inputs are cast as torch casts them. Every other
    call (a mask, dropout, broadcast batch or head dims, a backend without kernels, an input torch
    rejects) runs ``torch.nn.functional.scaled_dot_product_attention`` itself, so results and errors
    are torch's; the ``gradkernels`` logger says so at debug level (in eager mode; under
    ``torch.compile`` the hand-over is decided while tracing, silently, without a graph break).

    Args:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa: as torch's.

    Returns:
        (..., Hq, L, Ev) tensor, as torch's.
    """
    reason = _sdpa_handover_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        if not torch.compiler.is_compiling():  # Dynamo cannot trace a logger call (a graph break)
            _log.debug("scaled_dot_product_attention: %s; running torch's implementation", reason)
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:  # torch < 2.5 has no enable_gqa argument: pass it only when set
            kwargs["enable_gqa"] = True
        # Looked up at call time: while gradkernels.patching routes torch's attribute here, its router
        # sends this nested call to torch's own function.
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs)
    q, k, v = autocast_inputs(query.device.type, query, key, value)
    lead = q.shape[:-3] if q.dim() > 3 else ()
    to4 = (lambda t: t.reshape(-1, *t.shape[-3:])) if q.dim() >= 4 else (
        (lambda t: t.unsqueeze(0)) if q.dim() == 3 else (lambda t: t[None, None]))
    q4, k4, v4 = to4(q), to4(k), to4(v)
    scale = attention_ops.default_scale(q.shape[-1]) if scale is None else float(scale)
    out, _ = autograd.attention(q4, k4, v4, 0 if is_causal else None, scale)
    if q.dim() >= 4:
        return out.reshape(*lead, *out.shape[1:])
    return out[0] if q.dim() == 3 else out[0, 0]
