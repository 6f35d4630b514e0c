"""Functional API: :func:`linear`, :func:`attention`, :func:`attention_varlen`, :func:`scaled_dot_product_attention`."""

from __future__ import annotations

import collections
import logging
import numbers

import torch

from . import autograd
from . import dropout as dropout_rng
from ._device import autocast_inputs, backend_for
from .ops import attention as attention_ops
from .ops import attention_features
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
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, return_lse=False):
    """Flash-style attention ``softmax(q k^T * scale) v``, forward and backward in Triton kernels.

    No (Lq x Lk) tensor is stored or allocated: the forward keeps the log-sum-exp of each row and the
    backward recomputes the softmax from it (and the dropout mask from its seed).

    Positions: query ``i`` in [0, Lq), key ``j`` in [0, Lk); the diagonal is bottom-right,
    ``j = i + Lk - Lq`` (the last query is aligned with the last key).

    Args:
        q: (B, Hq, Lq, D) queries. k: (B, Hkv, Lk, D) keys. v: (B, Hkv, Lk, Dv) values. Any strides
            (a (B, L, H, D) tensor transposed to (B, H, L, D) is read in place); Hq a multiple of Hkv
            (grouped-query attention; Hkv = 1 is multi-query); D, Dv <= 256; one floating dtype.
        causal: query i sees keys ``j <= i + Lk - Lq`` (bottom-right, FlashAttention >= 2.1; the last
            query sees every key, as with a KV cache): the window's right side becomes 0. With Lq > Lk the
            first ``Lq - Lk`` rows see no key. (torch's ``is_causal`` is top-left aligned: use
            :func:`scaled_dot_product_attention` for that.)
        scale: softmax scale; ``1 / sqrt(D)`` when None.
        window_size: ``(left, right)``: query i sees key j iff
            ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``; -1 leaves a side unbounded (the default:
            no window). With ``causal=True`` right is 0 whatever is given (FlashAttention's rule).
        softcap: ``> 0``: scores become ``softcap * tanh(scale * q.k / softcap)`` before the softmax
            (Gemma 2's attention-logit soft-capping); 0: off.
        alibi_slopes: None, or float32 (Hq,) or (B, Hq): adds ``-slope * |i + Lk - Lq - j|`` to the
            (soft-capped) scaled scores. Not differentiated.
        dropout_p: drop probability of the attention weights, in [0, 1): kept weights are scaled by
            ``1 / (1 - dropout_p)``. The keep-mask comes from Philox seeded by one draw from the default
            generator of q's device (reproducible after ``torch.manual_seed``), is regenerated in the
            backward, and depends only on (seed, batch, head, i, j): see :mod:`gradkernels.dropout` and
            :func:`gradkernels.dropout_mask`. Same distribution as torch's dropout, not its bitwise mask.
        return_lse: also return the natural-log log-sum-exp of each row's scores (after softcap and
            ALiBi, before dropout), so partial results over key chunks can be merged exactly. It is
            not differentiable (no gradient flows back through it).

    Rows that see no key (causal with Lq > Lk, or a window) give output 0, LSE ``-inf`` and zero
    gradients.

    Returns:
        ``out`` (B, Hq, Lq, Dv) in the input dtype (the autocast dtype under ``torch.autocast``), and
        with ``return_lse=True`` also ``lse`` (B, Hq, Lq), fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: a non-tensor, an integer tensor, mixed dtypes (outside autocast), a non-bool
            ``causal``, a non-numeric ``scale``, ``softcap`` or ``dropout_p``, a ``window_size`` that is not
            a pair of ints, ``alibi_slopes`` not a float32 tensor.
        ValueError: not 4-D, mismatched batch, heads, lengths or head dims, Hq not a multiple of Hkv,
            a head dim over 256, tensors on different devices, a non-finite ``scale``, a window side below
            -1, a negative or non-finite ``softcap``, ``alibi_slopes`` of another shape or device,
            ``dropout_p`` outside [0, 1).
    """
    attention_ops.check_attention_args(q, k, v, scale, same_dtype=False)
    left, right, softcap, alibi_slopes, dropout_p = attention_features.check_features(
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        batch=q.shape[0], heads=q.shape[1], device=q.device)
    q, k, v = autocast_inputs(q.device.type, q, k, v)
    attention_ops.check_attention_args(q, k, v, scale)
    scale = attention_ops.default_scale(q.shape[-1]) if scale is None else float(scale)
    diag = k.shape[2] - q.shape[2]
    if left == -1 and right in (-1, 0) and softcap == 0.0 and alibi_slopes is None and dropout_p == 0.0:
        # The plain route, unchanged: nothing but (bottom-right) causal masking.
        out, lse = autograd.attention(q, k, v, diag if right == 0 else None, scale)
    else:
        rng_state = dropout_rng.new_rng_state(q.device) if dropout_p > 0 else None
        spec = autograd.FeatureSpec(diag, scale, left, right, softcap, dropout_p)
        out, lse = autograd.attention_features(q, k, v, alibi_slopes, rng_state, None, None, spec)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, return_lse=False):
    """Attention over a batch of variable-length sequences packed back to back, without padding.

    Sequence ``s`` holds queries ``q[cu_seqlens_q[s]:cu_seqlens_q[s + 1]]`` and keys/values
    ``k, v[cu_seqlens_k[s]:cu_seqlens_k[s + 1]]`` and attends only within itself; every other argument
    means what it means for :func:`attention`, per sequence (positions, the bottom-right diagonal
    ``j = i + Lk_s - Lq_s``, causal, the window, ALiBi). Sequences of length 0 are allowed (no queries:
    nothing; no keys: output 0, LSE ``-inf``). GQA as in :func:`attention`. Gradients for q, k and v.

    Args:
        q: (total_q, Hq, D). k: (total_k, Hkv, D). v: (total_k, Hkv, Dv). Any strides, one dtype.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the sequence lengths: start at 0,
            non-decreasing, end at total_q / total_k.
        max_seqlen_q, max_seqlen_k: ints, at least the longest query / key sequence (the kernels size
            their grid with them).
        causal, scale, window_size, softcap, dropout_p, return_lse: as :func:`attention`.
        alibi_slopes: None, or float32 (Hq,) or (batch, Hq).

    Returns:
        ``out`` (total_q, Hq, Dv) in the input dtype, and with ``return_lse=True`` also ``lse``
        (Hq, total_q), fp32 (fp64 for fp64 inputs). The dropout mask of sequence ``s`` is the one of
        batch element ``s`` of a dense call (positions within the sequence).

    Raises:
        TypeError / ValueError: as :func:`attention`, and ``cu_seqlens_*`` that are not int32, not 1-D of
            equal length, do not start at 0, decrease, do not end at the total, or hold a sequence longer
            than ``max_seqlen_*`` (their values are read on the host in eager mode: one small copy; under
            ``torch.compile`` and CUDA graph capture only dtype, shape and device are checked).
    """
    attention_features.check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                         same_dtype=False)
    left, right, softcap, alibi_slopes, dropout_p = attention_features.check_features(
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        batch=cu_seqlens_q.shape[0] - 1, heads=q.shape[1], device=q.device, batch_name="batch")
    q, k, v = autocast_inputs(q.device.type, q, k, v)
    attention_features.check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    scale = attention_ops.default_scale(q.shape[-1]) if scale is None else float(scale)
    rng_state = dropout_rng.new_rng_state(q.device) if dropout_p > 0 else None
    spec = autograd.FeatureSpec(None, scale, left, right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    out, lse = autograd.attention_features(q, k, v, alibi_slopes, rng_state, cu_seqlens_q, cu_seqlens_k, spec)
    return (out, lse) if return_lse else out


def _sdpa_handover_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Why a ``scaled_dot_product_attention`` call goes to torch, or None when the kernels cover it (a mask
    is examined afterwards, by :func:`_padding_plan`)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        return "dropout_p is not a number in [0, 1)"
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


# How the SDPA drop-in ran its calls (eager mode only): "kernels", "key padding -> varlen" or
# "torch: <reason>". Read through gradkernels.patching.attention_paths().
sdpa_paths: collections.Counter = collections.Counter()


def _record(path, log=True):
    if not torch.compiler.is_compiling():  # Dynamo cannot trace a logger call (a graph break)
        sdpa_paths[path] += 1
        if log:  # the plain kernel path is counted, not logged
            _log.debug("scaled_dot_product_attention: %s", path)


def _padding_plan(query, key, attn_mask, is_causal):
    """``(plan, reason)`` for a call with ``attn_mask``: ``plan = (kind, keep)`` when the mask is a boolean
    key-padding mask (``kind = "keys"``: every query row sees the same keys), or a bottom-right causal
    mask and key padding where each sequence's real keys are a suffix (``"causal_left"``: left padding)
    or a prefix (``"causal_right"``: right padding); ``keep`` (B, Lk) marks the real keys. Else
    ``(None, reason)``: the call goes to torch. Reads the mask's values (one device synchronisation), so
    under ``torch.compile`` masks always go to torch."""
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        return None, "attn_mask is not a boolean tensor"
    if is_causal:
        return None, "attn_mask together with is_causal"
    if torch.compiler.is_compiling():
        return None, "attn_mask under torch.compile (examining it needs its values)"
    if query.dim() != 4 or not 2 <= attn_mask.dim() <= 4:
        return None, "attn_mask with inputs that are not 4-D"
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    try:
        mask = attn_mask.expand(b, hq, lq, lk)
    except RuntimeError:
        return None, "attn_mask does not broadcast to (B, H, L, S)"
    if mask.device != query.device:
        return None, "attn_mask on another device"
    if hq > 1 and attn_mask.dim() >= 3 and attn_mask.shape[-3] > 1 and not torch.equal(mask, mask[:, :1].expand_as(mask)):
        return None, "attn_mask differs between heads"
    mask = mask[:, 0]  # (B, Lq, Lk)
    keep = mask[:, -1, :]  # the last query row sees every real key under either pattern
    if lq == 0 or lk == 0:
        return None, "an empty input"
    if torch.equal(mask, keep[:, None, :].expand_as(mask)):
        return ("keys", keep), None
    causal = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril(lk - lq)
    if not torch.equal(mask, causal & keep[:, None, :]):
        return None, "attn_mask is not a key-padding mask (or causal plus key padding)"
    if _TORCH_VERSION < (2, 5) and not bool(mask.any(-1).all()):  # torch < 2.5 gives NaN rows there
        return None, "attn_mask leaves a row without keys (torch < 2.5 gives NaN there)"
    rising = keep[:, 1:] >= keep[:, :-1]  # False -> True only: real keys are a suffix
    if bool(rising.all()):
        return ("causal_left", keep), None
    if bool((keep[:, 1:] <= keep[:, :-1]).all()):
        return ("causal_right", keep), None
    return None, "causal mask with key padding in the middle of a sequence"


def _varlen_over_real_keys(q, k, v, plan, scale, dropout_p):
    """Attention with a key-padding plan (:func:`_padding_plan`) as varlen calls over the real keys only;
    q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev); returns (B, Hq, Lq, Ev) with torch's SDPA
    semantics (padded query rows included: they attend to the keys the mask gives them)."""
    kind, keep = plan
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    n = keep.sum(-1, dtype=torch.int32)
    idx_k = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    k_packed, v_packed = (t.transpose(1, 2).reshape(b * lk, *t.shape[1:2], t.shape[3])[idx_k] for t in (k, v))
    cu_k = torch.nn.functional.pad(torch.cumsum(n, 0, dtype=torch.int32), (1, 0))
    counts = n.tolist()
    max_k = max(counts)
    rows = q.transpose(1, 2)  # (B, Lq, Hq, E)
    kw = dict(scale=scale, dropout_p=dropout_p)
    if kind != "causal_right":
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * lq
        out = attention_varlen(rows.reshape(b * lq, hq, q.shape[3]), k_packed, v_packed, cu_q, cu_k, lq, max_k,
                               causal=kind == "causal_left", **kw)
        return out.view(b, lq, hq, -1).transpose(1, 2)
    # Right padding under a bottom-right causal mask (offset c = Lk - Lq): row i sees j <= min(i + c, n - 1),
    # so rows i < n - c are causal over the n real keys and the rest see all of them.
    c = lk - lq
    causal_rows = [min(max(m - c, 0), lq) for m in counts]
    first = torch.tensor(causal_rows, device=q.device)
    is_causal_row = torch.arange(lq, device=q.device)[None, :] < first[:, None]  # (B, Lq)
    out = q.new_zeros((b * lq, hq, v.shape[3]))
    flat = rows.reshape(b * lq, hq, q.shape[3])
    for causal, select, lengths in ((True, is_causal_row, causal_rows),
                                    (False, ~is_causal_row, [lq - r for r in causal_rows])):
        if not any(lengths):
            continue
        idx = torch.nonzero(select.flatten(), as_tuple=False).flatten()
        cu_q = torch.nn.functional.pad(torch.tensor(lengths, device=q.device).cumsum(0, dtype=torch.int32), (1, 0))
        part = attention_varlen(flat[idx], k_packed, v_packed, cu_q, cu_k, max(lengths), max_k, causal=causal, **kw)
        out = out.index_put((idx,), part)
    return out.view(b, lq, hq, -1).transpose(1, 2)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature and semantics.

    Runs on the Triton kernels: query (..., Hq, L, E), key (..., H, S, E), value (..., H, S, Ev) with the
    same leading dims, H == Hq (or Hq a multiple of H with ``enable_gqa=True``), E, Ev <= 256.
    ``is_causal`` is torch's top-left alignment (query i sees keys ``j <= i``). ``dropout_p > 0`` runs
    gradkernels' dropout (:func:`attention`'s): the same distribution as torch's, not its bitwise mask.

    ``attn_mask``: in eager mode, a boolean mask that is a pure key-padding mask (every query row sees
    the same keys) or a causal mask plus key padding (left or right padding, the masks Hugging Face
    models build for padded batches), with 4-D inputs, runs on the kernels as a packed varlen batch over
    the real keys (:func:`attention_varlen`), with torch's semantics for every row (padded query rows
    included). Examining the mask costs one device synchronisation.

    Under ``torch.autocast`` the inputs are cast as torch casts them. Every other call (another mask, a
    mask under ``torch.compile``, broadcast batch or head dims, a backend without kernels, an input torch
    rejects) runs ``torch.nn.functional.scaled_dot_product_attention`` itself, so results and errors are
    torch's. The ``gradkernels`` logger says at debug level when a call went to torch (and why) or ran
    as varlen, and :data:`sdpa_paths` counts every call by path (eager mode; under ``torch.compile`` the decision is made while
    tracing, silently, without a graph break).

    Args:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa: as torch's.

    Returns:
        (..., Hq, L, Ev) tensor, as torch's.
    """
    reason = _sdpa_handover_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    plan = None
    if reason is None and attn_mask is not None:
        plan, reason = _padding_plan(query, key, attn_mask, is_causal)
    if reason is not None:
        _record(f"torch: {reason}")
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:  # torch < 2.5 has no enable_gqa argument: pass it only when set
            kwargs["enable_gqa"] = True
        # Looked up at call time: while gradkernels.patching routes torch's attribute here, its router
        # sends this nested call to torch's own function.
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs)
    q, k, v = autocast_inputs(query.device.type, query, key, value)
    scale = attention_ops.default_scale(q.shape[-1]) if scale is None else float(scale)
    if plan is not None:
        _record("key padding -> varlen")
        return _varlen_over_real_keys(q, k, v, plan, scale, float(dropout_p))
    _record("kernels", log=False)
    lead = q.shape[:-3] if q.dim() > 3 else ()
    to4 = (lambda t: t.reshape(-1, *t.shape[-3:])) if q.dim() >= 4 else (
        (lambda t: t.unsqueeze(0)) if q.dim() == 3 else (lambda t: t[None, None]))
    q4, k4, v4 = to4(q), to4(k), to4(v)
    if dropout_p == 0.0:
        out, _ = autograd.attention(q4, k4, v4, 0 if is_causal else None, scale)
    else:  # top-left causal: the diagonal j = i, window (-1, 0)
        spec = autograd.FeatureSpec(0, scale, -1, 0 if is_causal else -1, 0.0, float(dropout_p))
        rng_state = dropout_rng.new_rng_state(q.device)
        out, _ = autograd.attention_features(q4, k4, v4, None, rng_state, None, None, spec)
    if q.dim() >= 4:
        return out.reshape(*lead, *out.shape[1:])
    return out[0] if q.dim() == 3 else out[0, 0]
