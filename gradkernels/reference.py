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


# ----------------------------------------------------------------------------------------------------
# Attention features (window, softcap, ALiBi, dropout) and varlen: composed torch ops and the launchers'
# twins. Semantics in gradkernels.ops.attention_features.
# ----------------------------------------------------------------------------------------------------


def _relative_positions(lq, lk, diag, device):
    """(lq, lk) int64 ``j - i - diag``: 0 on the diagonal, negative to its left."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j - i - diag


def window_mask(lq: int, lk: int, diag: int, window_left: int, window_right: int, device=None) -> torch.Tensor:
    """Boolean (lq, lk), True where query i sees key j: ``diag - left <= j - i <= diag + right`` (-1:
    unbounded side)."""
    rel = _relative_positions(lq, lk, diag, device)
    visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if window_right >= 0:
        visible &= rel <= window_right
    if window_left >= 0:
        visible &= rel >= -window_left
    return visible


def _slopes(alibi_slopes, b, h, dtype):
    s = alibi_slopes.to(dtype)
    return s.view(1, h, 1, 1) if s.dim() == 1 else s.view(b, h, 1, 1)


def feature_scores(q, ke, diag, scale, features):
    """Scores ``(s, t)`` of the features' attention: ``s`` (B, H, Lq, Lk) with invisible keys at -inf, and
    ``t = tanh(scale q.k / softcap)`` (None without softcap), whose ``1 - t^2`` the backward needs.

    ``ke``: keys already expanded to q's heads. Composed torch ops in the inputs' dtype (differentiable).
    """
    b, h, lq, _ = q.shape
    lk = ke.shape[-2]
    s = (q @ ke.transpose(-2, -1)) * scale
    t = None
    if features.softcap > 0:
        t = torch.tanh(s / features.softcap)
        s = t * features.softcap
    rel = _relative_positions(lq, lk, diag, q.device)
    if features.alibi_slopes is not None:
        s = s - _slopes(features.alibi_slopes, b, h, s.dtype) * rel.abs().to(s.dtype)
    if features.window_left >= 0 or features.window_right >= 0:
        visible = window_mask(lq, lk, diag, features.window_left, features.window_right, q.device)
        s = s.masked_fill(~visible, float("-inf"))
    return s, t


def _dropout_keep(features, b, h, lq, lk, device, batch_offset=0):
    """The keep-mask (B, H, Lq, Lk) of ``features.rng_state``, or None without dropout. ``batch_offset``:
    the batch index of the first element (a varlen sequence's index)."""
    if features.dropout_p == 0:
        return None
    from . import dropout as dropout_rng

    rng = features.rng_state
    bh = ((torch.arange(b, device=device) + batch_offset)[:, None] * h
          + torch.arange(h, device=device)[None, :]).view(b, h, 1, 1)
    rows = torch.arange(lq, device=device).view(1, 1, lq, 1)
    cols = torch.arange(lk, device=device).view(1, 1, 1, lk)
    return dropout_rng.keep_mask(rng[0], rng[1], bh, rows, cols, features.dropout_p)


def attention_features(q, k, v, diag, scale, features, *, keep=None, batch_offset=0):
    """``(out, lse)`` of attention with features, by composed torch ops (autograd records them).

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); ``diag``: the diagonal (``Lk - Lq``
    bottom-right); ``features``: a :class:`gradkernels.ops.attention_features.Features`. ``keep``: the
    dropout keep-mask (B, Hq, Lq, Lk), generated from ``features.rng_state`` when None. The LSE is that
    of the scores before dropout.
    """
    ke, ve = _expand_kv(q, k, v)
    s, _ = feature_scores(q, ke, diag, scale, features)
    p, lse = _softmax_rows(s)
    if features.dropout_p > 0:
        if keep is None:
            keep = _dropout_keep(features, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, batch_offset)
        p = p * keep.to(p.dtype) * (1.0 / (1.0 - features.dropout_p))
    return p @ ve, lse


def attention_features_forward(q, k, v, diag, scale, features, *, batch_offset=0):
    """:func:`gradkernels.ops.attention.attention_features_forward` in torch: ``(out, lse, lse_lo)``.

    As :func:`attention_forward`, with the features; computed in the accumulator dtype. ``batch_offset``
    (twin-internal): the dropout batch index of the first element.
    """
    acc = accumulator_dtype(q.dtype)
    ke, ve = _expand_kv(q, k, v)
    s, _ = feature_scores(q.to(acc), ke.to(acc), diag, scale, features)
    p, _ = _softmax_rows(s)
    keep = _dropout_keep(features, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, batch_offset)
    if keep is not None:
        p = p * keep.to(acc) * (1.0 / (1.0 - features.dropout_p))
    out = empty_out(q, v.shape[-1])
    out.copy_(p @ ve.to(acc))
    lse, lse_lo = split_lse(torch.logsumexp(s.double(), dim=-1), acc)
    return out, lse, lse_lo


def attention_features_backward(grad_out, q, k, v, out, lse, lse_lo, diag, scale, features, *, need_dq=True,
                                need_dk=True, need_dv=True, batch_offset=0):
    """:func:`gradkernels.ops.attention.attention_features_backward` in torch: ``(dq, dk, dv)``.

    P recomputed from the scores and the given LSE; with dropout ``Z = keep / (1 - p)``:
    ``dV = (P Z)^T dO``, ``dP = (dO V^T) Z``, ``dS = P (dP - rowsum(dO * O))``, times ``1 - t^2`` with
    softcap; ``dQ = scale dS K``, ``dK = scale dS^T Q``, summed over each GQA group.
    """
    acc = accumulator_dtype(q.dtype)
    ke, ve = _expand_kv(q, k, v)
    s, t = feature_scores(q.to(acc), ke.to(acc), diag, scale, features)
    row = exact_lse(lse, lse_lo)[..., None]
    p = torch.where(row == float("-inf"), 0.0, torch.exp(s.double() - row)).to(acc)
    keep = _dropout_keep(features, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, batch_offset)
    z = None if keep is None else keep.to(acc) * (1.0 / (1.0 - features.dropout_p))
    do = grad_out.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    dp = do @ ve.to(acc).transpose(-2, -1)
    if z is not None:
        dp = dp * z
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    group = q.shape[1] // k.shape[1]

    def per_kv_head(x):
        return x.reshape(x.shape[0], k.shape[1], group, *x.shape[2:]).sum(2) if group > 1 else x

    def like(x, value):
        return torch.empty_like(x).copy_(value)

    pz = p if z is None else p * z
    dq = like(q, (ds @ ke.to(acc)) * scale) if need_dq else None
    dk = like(k, per_kv_head((ds.transpose(-2, -1) @ q.to(acc)) * scale)) if need_dk else None
    dv = like(v, per_kv_head(pz.transpose(-2, -1) @ do)) if need_dv else None
    return dq, dk, dv


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """[(start_q, end_q, start_k, end_k)] per sequence (reads the offsets on the host)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[s], cq[s + 1], ck[s], ck[s + 1]) for s in range(len(cq) - 1)]


def _sequence_features(features, s):
    """The features of sequence ``s``: its row of (B, Hq) ALiBi slopes."""
    if features.alibi_slopes is not None and features.alibi_slopes.dim() == 2:
        return features._replace(alibi_slopes=features.alibi_slopes[s])
    return features


def _dense(t):
    """(L, H, D) -> (1, H, L, D), a view."""
    return t.transpose(0, 1).unsqueeze(0)


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, features):
    """:func:`gradkernels.ops.attention.attention_varlen_forward` in torch: ``(out, lse, lse_lo)``.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); ``out`` (total_q, Hq, Dv) in q's dtype,
    ``lse`` and ``lse_lo`` (Hq, total_q). Each sequence is the dense twin with its bottom-right diagonal,
    its ALiBi slopes and its index as the dropout batch index (a loop over sequences).
    """
    del max_seqlen_q, max_seqlen_k  # lengths come from the offsets
    acc = accumulator_dtype(q.dtype)
    out = torch.empty((q.shape[0], q.shape[1], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    lse_lo = torch.zeros_like(lse)
    for s, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0:
            continue
        if k1 == k0:
            out[q0:q1] = 0
            continue
        o, l, lo = attention_features_forward(_dense(q[q0:q1]), _dense(k[k0:k1]), _dense(v[k0:k1]),
                                              (k1 - k0) - (q1 - q0), scale, _sequence_features(features, s),
                                              batch_offset=s)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1], lse_lo[:, q0:q1] = l[0], lo[0]
    return out, lse, lse_lo


def attention_varlen_backward(grad_out, q, k, v, out, lse, lse_lo, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, scale, features, *, need_dq=True, need_dk=True, need_dv=True):
    """:func:`gradkernels.ops.attention.attention_varlen_backward` in torch: ``(dq, dk, dv)`` in the layouts
    of q, k, v (None where not needed), by the dense twin per sequence."""
    del max_seqlen_q, max_seqlen_k
    dq = torch.zeros_like(q) if need_dq else None
    dk = torch.zeros_like(k) if need_dk else None
    dv = torch.zeros_like(v) if need_dv else None
    for s, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0 or k1 == k0:
            continue
        g = attention_features_backward(
            _dense(grad_out[q0:q1]), _dense(q[q0:q1]), _dense(k[k0:k1]), _dense(v[k0:k1]), _dense(out[q0:q1]),
            lse[None, :, q0:q1], lse_lo[None, :, q0:q1], (k1 - k0) - (q1 - q0), scale,
            _sequence_features(features, s), need_dq=need_dq, need_dk=need_dk, need_dv=need_dv, batch_offset=s)
        for buf, grad, (a, b) in zip((dq, dk, dv), g, ((q0, q1), (k0, k1), (k0, k1))):
            if buf is not None:
                buf[a:b] = grad[0].transpose(0, 1)
    return dq, dk, dv


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, features, *, keeps=None):
    """``(out, lse)`` of varlen attention by composed torch ops (differentiable): out (total_q, Hq, Dv),
    lse (Hq, total_q). ``keeps``: optional per-sequence dropout keep-masks (Hq, Lq_s, Lk_s)."""
    outs, lses = [], []
    for s, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        keep = None if keeps is None else keeps[s][None]
        o, l = attention_features(_dense(q[q0:q1]), _dense(k[k0:k1]), _dense(v[k0:k1]), (k1 - k0) - (q1 - q0),
                                  scale, _sequence_features(features, s), keep=keep, batch_offset=s)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    if not outs:
        return q.new_empty((0, q.shape[1], v.shape[-1])), q.new_empty((q.shape[1], 0))
    return torch.cat(outs, 0), torch.cat(lses, 1)
