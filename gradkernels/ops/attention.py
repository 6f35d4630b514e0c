"""Launchers of the Flash-style attention kernels: validate -> allocate -> grid -> launch.

Pure functions of tensors and Python scalars (no global state besides the per-kernel autotuners), so
they can be wrapped in ``torch.library`` custom ops. Every launcher accepts preallocated outputs.

Causal masking is given as ``causal_offset``: ``None`` for no mask, else key j is visible to query i
iff ``j <= i + causal_offset`` (``Lk - Lq``: bottom-right, the library's convention; ``0``: top-left,
``torch.nn.functional.scaled_dot_product_attention``'s).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple, Optional

import torch
import triton

from .. import _device
from .common import FLOAT_DTYPES, accumulator_dtype  # noqa: F401 (accumulator_dtype: re-exported)
from ..kernels import attention as kernels
from ..kernels import attention_configs as configs

MAX_HEAD_DIM = configs.MAX_HEAD_DIM


def check_attention_args(q, k, v, scale=None, *, same_dtype=True):
    """Raise ``TypeError``/``ValueError`` naming the bad argument, before anything is launched.

    Expects q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), Hq a multiple of Hkv,
    D and Dv <= 256, one floating dtype (unless ``same_dtype=False``) and one device.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"q, k and v must have the same batch size, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have as many heads as k ({k.shape[1]}), got v of shape {tuple(v.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must have as many positions as k (Lk = {k.shape[2]}), got v of shape {tuple(v.shape)}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k must have the head dim of q (D = {q.shape[3]}), got k of shape {tuple(k.shape)}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q's head count ({hq}) must be a multiple of k's and v's ({hkv}) (grouped-query attention)"
        )
    for name, dim in (("q", q.shape[3]), ("v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all must be on one device")
    if same_dtype:
        for name, t in (("k", k), ("v", v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all must have one dtype")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")


def default_scale(head_dim):
    return 1.0 / math.sqrt(head_dim)


def empty_out(q, dv):
    """Output buffer in q's memory layout when q is a head-interleaved (B, L, H, D) tensor seen as
    (B, H, L, D): the caller's ``transpose(1, 2).reshape(B, L, H * Dv)`` is then a free view."""
    b, h, lq, _ = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty((b, lq, h, dv), device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty((b, h, lq, dv), device=q.device, dtype=q.dtype)


def _prune(kernel, tiles, named_args, **flags):
    """An autotuner's ``early_config_prune`` (with ``kernel`` bound):
    :func:`gradkernels.kernels.attention_configs.prune` for the launch's dtype and device architecture."""
    q = named_args["Q"]
    return configs.prune(tiles, {**named_args, **flags}, kernel=kernel, dtype_bytes=q.element_size(),
                         arch=_device.device_arch(q.device))


_FEATURE_FLAGS = configs.FEATURE_FLAGS
_KEYS = ["LQ_BUCKET", "LK_BUCKET", "HEAD_D", "HEAD_DV", "IS_CAUSAL", "INPUT_PRECISION", *_FEATURE_FLAGS]


@functools.lru_cache(maxsize=None)
def _autotuned(kernel):
    """One autotuner per kernel, keyed by bucketed lengths (a new length does not retune)."""
    if kernel == "fwd":
        fn, tiles = kernels.attn_fwd_kernel, configs.get_attn_fwd_configs()
    else:
        fn = kernels.attn_bwd_dkdv_kernel if kernel == "dkdv" else kernels.attn_bwd_dq_kernel
        tiles = configs.get_attn_bwd_configs()[kernel]
    keys = _KEYS + ["TMA_OK"] + (["COMPUTE_DK", "COMPUTE_DV"] if kernel == "dkdv" else [])
    prune = {"early_config_prune": functools.partial(_prune, kernel)}
    return triton.autotune(configs=tiles, key=keys, prune_configs_by=prune)(fn)


def _launch(kernel, fn, grid, args, flags, pinned, tma_ok=False):
    """Launch through the kernel's autotuner on a GPU, with the interpreter's ``pinned`` tile otherwise
    (a pinned ``TMA`` tile runs only where ``tma_ok``: the tests pin one to run the descriptor path)."""
    if _device.use_autotune():
        if tma_ok:
            _device.ensure_scratch_allocator()  # TMA tiles build their descriptors in global scratch
        _autotuned(kernel)[grid](*args, **flags)
    else:
        if pinned.get("TMA") and not tma_ok:
            pinned = {name: value for name, value in pinned.items() if name != "TMA"}
        fn[grid](*args, **flags, **pinned)


def _tma_ok(launch, *tensors):
    """Whether a launch may run TMA tiles (sm_90+, 16-bit; the prune checks the arch): a plain launch (no
    feature flag) whose tensors fit the descriptors' rules (``attention_configs.tma_compatible``)."""
    return not configs.has_features(launch.flags) and configs.tma_compatible(*tensors)


def _flags(q, d, dv, causal_offset, feature_flags=None):
    return dict(
        HEAD_D=d, HEAD_DV=dv, IS_CAUSAL=causal_offset is not None,
        INPUT_PRECISION=_device.dot_precision(q.dtype, q.device),
        BLOCK_D=configs.head_block(d), BLOCK_DV=configs.head_block(dv),
        **(feature_flags or _PLAIN_FLAGS),
    )


# The kernels' feature arguments (CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, SOFTCAP, DROPOUT_P, LEFT_OFFSET, DIAG,
# THRESHOLD, stride_ab, stride_ah) and flags of a plain launch: every feature off, which compiles to the
# kernels' plain code.
_PLAIN_ARGS = (None, None, None, None, 0.0, 0.0, 0, 0, 0, 0, 0)
_PLAIN_FLAGS = {name: False for name in _FEATURE_FLAGS}


class _Launch(NamedTuple):
    """What a launch with features adds: the kernels' feature arguments and flags, and the plain
    ``causal_offset`` (the window's right side; relative to each sequence's diagonal for varlen)."""

    args: tuple
    flags: dict
    causal_offset: Optional[int]


def _feature_launch(features, diag, *, cu_seqlens_q=None, cu_seqlens_k=None) -> _Launch:
    """The kernel arguments of ``features`` (a :class:`~gradkernels.ops.attention_features.Features`).

    Dense: ``diag`` is the diagonal (``Lk - Lq`` bottom-right); varlen (``cu_seqlens_*`` given): 0, and the
    kernels add each sequence's ``Lk - Lq``. Window ``(left, right)``: visible iff
    ``diag - left <= j - i <= diag + right``, i.e. ``CAUSAL_OFFSET = diag + right`` (IS_CAUSAL; none for
    ``right = -1``) and ``LEFT_OFFSET = diag - left`` (HAS_LEFT; none for ``left = -1``).
    """
    from .. import dropout as dropout_rng

    varlen = cu_seqlens_q is not None
    left, right = features.window_left, features.window_right
    slopes = features.alibi_slopes
    p = features.dropout_p
    args = (
        cu_seqlens_q, cu_seqlens_k, slopes, features.rng_state if p > 0 else None,
        float(features.softcap), float(p), diag - left if left >= 0 else 0, diag,
        dropout_rng.threshold_bits(p) if p > 0 else 0,
        slopes.stride(0) if slopes is not None and slopes.dim() == 2 else 0,
        slopes.stride(-1) if slopes is not None else 0,
    )
    flags = dict(IS_VARLEN=varlen, HAS_LEFT=left >= 0, HAS_SOFTCAP=features.softcap > 0,
                 HAS_ALIBI=slopes is not None, HAS_DROPOUT=p > 0)
    return _Launch(args, flags, None if right < 0 else diag + right)


def _sign_folded(q, scale):
    """``(q', |scale|)`` with ``softmax(scale * q k^T) = softmax(|scale| * q' k^T)``.

    The kernels take the row maximum of the unscaled scores, which needs a positive scale: a negative
    scale is folded into Q (``q' = -q``), a zero scale gives ``q' = 0 * q`` (uniform weights; NaN and
    inf in q still give NaN, as torch's ``(q @ k^T) * 0`` does). Only those rare calls pay the copy.
    """
    if scale > 0:
        return q, scale
    return (q.neg() if scale < 0 else q * 0.0), (-scale if scale < 0 else 1.0)


def split_lse(lse_exact, dtype=torch.float32):
    """``(lse, lse_lo)`` as the forward kernel writes them, from an exact (fp64) natural-log LSE.

    ``lse`` is the LSE rounded to ``dtype`` and ``lse_lo`` the base-2 residual the backward adds:
    ``lse2 = fl(lse * log2(e)) + lse_lo``, computed in ``dtype`` as the kernels compute ``fl(...)``.
    Rows of ``-inf`` give ``lse_lo = 0``. Used where an LSE is produced outside the forward kernel
    (merging partial results, e.g. ring attention) and then handed to :func:`attention_backward`.
    """
    lse = lse_exact.to(dtype)
    hi = lse * _LOG2E  # in ``dtype``: the kernels' fl(lse * log2 e)
    lo = torch.where(torch.isfinite(lse), lse_exact.double() * _LOG2E - hi.double(), 0.0)
    return lse, lo.to(dtype)


def exact_lse(lse, lse_lo):
    """The fp64 natural-log LSE that ``(lse, lse_lo)`` represent (inverse of :func:`split_lse`)."""
    hi = lse * _LOG2E
    return torch.where(torch.isfinite(lse), (hi.double() + lse_lo.double()) * _LN2, lse.double())


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def attention_forward(q, k, v, causal_offset, scale, *, out=None, lse=None, lse_lo=None):
    """Forward of ``softmax(q k^T * scale [+ causal mask]) v`` through ``attn_fwd_kernel``.

    Args:
        q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); any strides, one dtype and device
            (validated by :func:`check_attention_args`, not here).
        causal_offset: None (no mask) or int: key j is visible to query i iff ``j <= i + causal_offset``.
        scale: the softmax scale (a Python float; carried into the kernel in fp64).
        out: optional (B, Hq, Lq, Dv) buffer, q's dtype, any strides.
        lse, lse_lo: optional (B, Hq, Lq) buffers, fp32 (fp64 for fp64 inputs), with the same strides.

    Returns:
        ``(out, lse, lse_lo)``; ``lse`` is the natural-log log-sum-exp of each row's scaled scores,
        ``-inf`` (with an all-zero output row) where a row sees no key; ``lse_lo`` its base-2 rounding
        residual (see :func:`split_lse`), which :func:`attention_backward` needs for exact gradients at
        large logits.
    """
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if out is None:
        out = empty_out(q, dv)
    if lse is None:
        lse = torch.empty((b, h, lq), device=q.device, dtype=accumulator_dtype(q.dtype))
    if lse_lo is None:
        lse_lo = torch.empty_like(lse)
    if lse_lo.stride() != lse.stride():
        raise ValueError(f"lse_lo must have the strides of lse {lse.stride()}, got {lse_lo.stride()}")
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse, lse_lo
    if configs.use_decode(lq) and lk > 0:
        _decode(q, k, v, out, lse, lse_lo, scale, causal_offset)
    else:
        _forward(q, k, v, out, lse, lse_lo, scale, _Launch(_PLAIN_ARGS, _PLAIN_FLAGS, causal_offset),
                 b, lq, lk, q.stride(), k.stride(), v.stride(), out.stride(), lse.stride())
    return out, lse, lse_lo


def _decode(q, k, v, out, lse, lse_lo, scale, causal_offset, num_splits=None):
    """The decoding forward (``lq <= attention_configs.DECODE_MAX_LQ``, no features): the query heads of a
    kv head packed into one tile's rows, the keys split across programs (``num_splits``: the
    ``attention_configs.decode_splits`` heuristic when None), the partials merged in split order by the
    combine kernel, which writes ``out``, ``lse`` and ``lse_lo`` as :func:`_forward` would."""
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = h // hkv
    rows = group * lq
    q, scale = _sign_folded(q, scale)
    flags = _flags(q, d, dv, causal_offset)
    flags["INPUT_PRECISION"] = configs.backward_precision(flags["INPUT_PRECISION"], d, dv)
    tile = configs.decode_config(rows, d, dv, q.element_size(), flags["INPUT_PRECISION"])
    row_blocks = triton.cdiv(rows, tile["BLOCK_M"])
    if num_splits is None:
        sms = _device.num_sms(q.device.index) if q.device.type == "cuda" else _device.num_sms()
        num_splits, per = configs.decode_splits(lk, b * hkv * row_blocks, tile["BLOCK_N"], sms)
    else:
        num_splits, per = configs.split_keys(lk, num_splits, tile["BLOCK_N"])
    acc_dtype = accumulator_dtype(q.dtype)
    part_rows = b * hkv * num_splits * rows
    part_acc = torch.empty((part_rows, dv), device=q.device, dtype=acc_dtype)
    part_m = torch.empty((part_rows,), device=q.device, dtype=acc_dtype)
    part_l = torch.empty_like(part_m)
    # An offset >= Lk shows every key to every row, one <= -Lq none: clamped there, the kernel's int32
    # bounds (offset + 1, Lq + offset) cannot overflow.
    offset = 0 if causal_offset is None else min(max(int(causal_offset), -lq), lk)
    kernels.attn_decode_kernel[(b * hkv * num_splits * row_blocks,)](
        q, k, v, part_acc, part_m, part_l, float(scale),
        hkv, group, lq, lk, offset, rows, per, num_splits, row_blocks,
        *q.stride(), *k.stride(), *v.stride(),
        HEAD_D=d, HEAD_DV=dv, IS_CAUSAL=flags["IS_CAUSAL"], INPUT_PRECISION=flags["INPUT_PRECISION"],
        BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], BLOCK_D=flags["BLOCK_D"], BLOCK_DV=flags["BLOCK_DV"],
        num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )
    combine_rows = configs.decode_combine_rows(dv, part_acc.element_size())
    combine_blocks = triton.cdiv(rows, combine_rows)
    kernels.attn_decode_combine_kernel[(b * hkv * combine_blocks,)](
        part_acc, part_m, part_l, out, lse, lse_lo, hkv, group, lq, rows, num_splits, combine_blocks,
        *out.stride(), *lse.stride(),
        HEAD_DV=dv, BLOCK_R=combine_rows, BLOCK_DV=flags["BLOCK_DV"], num_warps=configs.DECODE_COMBINE_WARPS,
    )


def _forward(q, k, v, out, lse, lse_lo, scale, launch, b, lq, lk, q_strides, k_strides, v_strides, o_strides,
             l_strides):
    """One launch of ``attn_fwd_kernel`` over ``b`` (batch or sequences) x heads x query blocks of ``lq``;
    strides in the kernel's (batch, head, row, dim) order."""
    h, d = q.shape[-2] if launch.flags["IS_VARLEN"] else q.shape[1], q.shape[-1]
    hkv = k.shape[-2] if launch.flags["IS_VARLEN"] else k.shape[1]
    dv = v.shape[-1]
    q, scale = _sign_folded(q, scale)
    causal_offset = launch.causal_offset
    tma_ok = _tma_ok(launch, q, k, v)
    args = (
        q, k, v, out, lse, lse_lo, float(scale),
        h, h // hkv, lq, lk, 0 if causal_offset is None else int(causal_offset),
        configs.seqlen_bucket(lq), configs.seqlen_bucket(lk), int(tma_ok),
        *q_strides, *k_strides, *v_strides, *o_strides, *l_strides, *launch.args,
    )

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)

    _launch("fwd", kernels.attn_fwd_kernel, grid, args, _flags(q, d, dv, causal_offset, launch.flags),
            configs.INTERPRETER_FWD_CONFIG, tma_ok)


def attention_backward(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale, *, need_dq=True, need_dk=True,
                       need_dv=True, dq=None, dk=None, dv=None, delta=None):
    """Gradients of :func:`attention_forward` for the ones asked for; P is recomputed from Q, K, LSE.

    Args:
        grad_out: (B, Hq, Lq, Dv), any strides. q, k, v, out, lse, lse_lo: as in and from the forward
            (``lse_lo`` with the strides of ``lse``).
        causal_offset, scale: as given to the forward.
        need_dq, need_dk, need_dv: which gradients to compute; the dQ kernel is skipped without dq,
            the dK/dV kernel without dk and dv, and one of its two products without the other.
        dq, dk, dv: optional output buffers (shapes and dtypes of q, k, v; any strides).
        delta: optional (B, Hq, Lq) scratch buffer in the LSE dtype for ``rowsum(dO * O)``.

    Returns:
        ``(dq, dk, dv)`` with None for the gradients not asked for. dK and dV of a kv head are summed
        over its query-head group. Deterministic: no atomics, bitwise identical from run to run.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    dq, dk, dv, done = _gradient_buffers(q, k, v, need_dq, need_dk, need_dv, dq, dk, dv, lq == 0 or b * h == 0 or lk == 0)
    if done:
        return dq, dk, dv
    if lse_lo.stride() != lse.stride():
        raise ValueError(f"lse_lo must have the strides of lse {lse.stride()}, got {lse_lo.stride()}")
    if delta is None:
        delta = torch.empty((b, h, lq), device=q.device, dtype=accumulator_dtype(q.dtype))
    _backward(grad_out, q, k, v, out, lse, lse_lo, scale, _Launch(_PLAIN_ARGS, _PLAIN_FLAGS, causal_offset),
              dq, dk, dv, delta, b, lq, lk, (b, lq, out.stride(), grad_out.stride(), delta.stride(), lse.stride()),
              (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(), *delta.stride()),
              lambda t: t.stride())
    return dq, dk, dv


def _gradient_buffers(q, k, v, need_dq, need_dk, need_dv, dq, dk, dv, empty):
    """``(dq, dk, dv, done)``: the buffers asked for (allocated where not given), None for the others; done
    (all zeroed) when nothing needs computing."""
    if need_dq and dq is None:
        dq = torch.empty_like(q)
    if need_dk and dk is None:
        dk = torch.empty_like(k)
    if need_dv and dv is None:
        dv = torch.empty_like(v)
    if not need_dq:
        dq = None
    if not need_dk:
        dk = None
    if not need_dv:
        dv = None
    if not (need_dq or need_dk or need_dv):
        return dq, dk, dv, True
    if empty:
        # Nothing to recompute: every row is empty (Lk = 0) or there is no row (Lq = 0).
        for t in (dq, dk, dv):
            if t is not None:
                t.zero_()
        return dq, dk, dv, True
    return dq, dk, dv, False


def _backward(grad_out, q, k, v, out, lse, lse_lo, scale, launch, dq, dk, dv, delta, b, lq, lk, pre, in_strides,
              kernel_strides):
    """The Delta preprocess, the dK/dV kernel and the dQ kernel over ``b`` x heads x blocks.

    ``pre``: the preprocess's view ``(batch, rows, o strides, do strides, delta strides, lse strides)``;
    ``in_strides``: q, k, v, dO, LSE and Delta strides in the kernels' order; ``kernel_strides(t)``: a
    gradient buffer's strides in that order.
    """
    varlen = launch.flags["IS_VARLEN"]
    h, d = (q.shape[-2] if varlen else q.shape[1]), q.shape[-1]
    hkv = k.shape[-2] if varlen else k.shape[1]
    dvdim = v.shape[-1]
    need_kv = dk is not None or dv is not None
    q, kernel_scale = _sign_folded(q, scale)

    pre_b, pre_rows, o_strides, do_strides, de_strides, l_strides = pre
    tma_ok = _tma_ok(launch, q, k, v, grad_out)
    # TMA dK/dV tiles read the row statistics and dO' (dO with the LSE residual folded in) from padded
    # buffers the preprocess writes, with int32 offsets within a kv head's group of query heads (beyond
    # that, no TMA tile for dK/dV or dQ). Only where a TMA tile can run (the prune offers them on sm_90+
    # only). dO' is one more dO-sized buffer, alive for the dK/dV launch.
    lq_pad = triton.cdiv(lq, configs.ROW_STATS_ALIGN) * configs.ROW_STATS_ALIGN
    dv_pad = configs.do_row_width(dvdim)
    tma_ok = tma_ok and (h // hkv) * 2 * lq_pad < 2**31
    stats = do_s = None
    if tma_ok and need_kv and configs.tma_supported(_device.device_arch(q.device)):
        stats = torch.empty((b * h * 2 * lq_pad,), device=q.device, dtype=delta.dtype)
        do_s = torch.empty((b * h * lq_pad * dv_pad,), device=q.device, dtype=grad_out.dtype)
    delta_tile = (configs.preprocess_config(dvdim, q.element_size()) if _device.use_autotune()
                  else configs.INTERPRETER_PREPROCESS_CONFIG)
    pre_blocks = triton.cdiv(lq_pad if stats is not None else pre_rows, delta_tile["BLOCK_M"])
    kernels.attn_bwd_preprocess_kernel[(pre_blocks * pre_b * h,)](
        out, grad_out, delta, lse, lse_lo, stats, do_s, h, pre_rows, lq_pad, *o_strides, *do_strides, *de_strides,
        *l_strides, HEAD_DV=dvdim, BLOCK_DV=configs.head_block(dvdim), ROW_STATS=stats is not None,
        num_warps=configs.PREPROCESS_WARPS, **delta_tile,
    )

    causal_offset = launch.causal_offset
    flags = _flags(q, d, dvdim, causal_offset, launch.flags)
    flags["INPUT_PRECISION"] = configs.backward_precision(flags["INPUT_PRECISION"], d, dvdim)
    offset = 0 if causal_offset is None else int(causal_offset)
    common = (float(kernel_scale),)
    sizes_tail = (lq, lk, offset, configs.seqlen_bucket(lq), configs.seqlen_bucket(lk))

    if need_kv:
        # A skipped gradient's pointer is never read (COMPUTE_DK/DV = False): pass the other buffer.
        dk_buf = dk if dk is not None else dv
        dv_buf = dv if dv is not None else dk
        args = (q, k, v, grad_out, lse, lse_lo, delta, dk_buf, dv_buf, stats, do_s, *common, hkv, h // hkv, *sizes_tail,
                int(tma_ok), lq_pad, *in_strides, *kernel_strides(dk_buf), *kernel_strides(dv_buf), *launch.args)

        def grid_kv(meta):
            return (triton.cdiv(lk, meta["BLOCK_N"]) * b * hkv,)

        if dk is not None and dv is not None and configs.wide_heads(d, dvdim):
            passes = ((True, False), (False, True))  # one accumulator per launch (registers)
        else:
            passes = ((dk is not None, dv is not None),)
        for compute_dk, compute_dv in passes:
            _launch("dkdv", kernels.attn_bwd_dkdv_kernel, grid_kv, args,
                    dict(flags, COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv), configs.INTERPRETER_BWD_CONFIG, tma_ok)
    if dq is not None:
        args = (q, k, v, grad_out, lse, lse_lo, delta, dq, *common, h, h // hkv, *sizes_tail, int(tma_ok),
                *in_strides, *kernel_strides(dq), *launch.args)

        def grid_q(meta):
            return (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)

        _launch("dq", kernels.attn_bwd_dq_kernel, grid_q, args, flags, configs.INTERPRETER_BWD_CONFIG, tma_ok)
        if scale <= 0:  # dQ of the folded q' = sign * q (see _sign_folded)
            dq.neg_() if scale < 0 else dq.zero_()


# ----------------------------------------------------------------------------------------------------
# Attention with features (window, softcap, ALiBi, dropout) and varlen: the launchers the custom ops call
# when ops.attention_features.features_supported_by_kernels says so. Same arguments and results as the
# torch twins of the same names in gradkernels.reference.
# ----------------------------------------------------------------------------------------------------


def attention_features_forward(q, k, v, diag, scale, features):
    """:func:`attention_forward` with the features of ``features`` (a
    :class:`~gradkernels.ops.attention_features.Features`; semantics there): ``(out, lse, lse_lo)``.

    ``diag``: the diagonal, ``Lk - Lq`` for the library's bottom-right convention. The LSE is that of the
    scores before dropout.
    """
    b, h, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    out = empty_out(q, dv)
    lse = torch.empty((b, h, lq), device=q.device, dtype=accumulator_dtype(q.dtype))
    lse_lo = torch.empty_like(lse)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse, lse_lo
    _forward(q, k, v, out, lse, lse_lo, scale, _feature_launch(features, int(diag)), b, lq, lk,
             q.stride(), k.stride(), v.stride(), out.stride(), lse.stride())
    return out, lse, lse_lo


def attention_features_backward(grad_out, q, k, v, out, lse, lse_lo, diag, scale, features, *, need_dq=True,
                                need_dk=True, need_dv=True):
    """Gradients of :func:`attention_features_forward`: ``(dq, dk, dv)``, None where not asked for.

    The dropout keep-mask is regenerated from ``features.rng_state`` (never stored)."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    dq, dk, dv, done = _gradient_buffers(q, k, v, need_dq, need_dk, need_dv, None, None, None,
                                         lq == 0 or b * h == 0 or lk == 0)
    if done:
        return dq, dk, dv
    delta = torch.empty((b, h, lq), device=q.device, dtype=accumulator_dtype(q.dtype))
    _backward(grad_out, q, k, v, out, lse, lse_lo, scale, _feature_launch(features, int(diag)), dq, dk, dv, delta,
              b, lq, lk, (b, lq, out.stride(), grad_out.stride(), delta.stride(), lse.stride()),
              (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(), *delta.stride()),
              lambda t: t.stride())
    return dq, dk, dv


def _packed_strides(t):
    """A packed (total, H, D) tensor's strides in the kernels' (batch, head, row, dim) order: the batch
    stride is unused (each sequence's start row comes from cu_seqlens)."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def _packed_row_strides(t):
    """A (H, total) LSE-like tensor's strides in the kernels' (batch, head, row) order."""
    return (0, t.stride(0), t.stride(1))


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, features):
    """Packed variable-length attention in one launch: ``(out (total_q, Hq, Dv), lse (Hq, total_q), lse_lo)``.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); int32 ``cu_seqlens_*`` (batch + 1);
    ``max_seqlen_*`` at least each sequence's length (they size the grid). Each sequence attends within
    itself with its bottom-right diagonal; no padding. Rows of sequences with no key: output 0, LSE -inf.
    """
    total_q, h, _ = q.shape
    dv = v.shape[-1]
    nseq = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, total_q), dtype=accumulator_dtype(q.dtype), device=q.device)
    lse_lo = torch.empty_like(lse)
    if total_q == 0 or h == 0 or nseq == 0 or int(max_seqlen_q) == 0:
        return out, lse, lse_lo
    _forward(q, k, v, out, lse, lse_lo, scale,
             _feature_launch(features, 0, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k),
             nseq, int(max_seqlen_q), int(max_seqlen_k), _packed_strides(q), _packed_strides(k), _packed_strides(v),
             _packed_strides(out), _packed_row_strides(lse))
    return out, lse, lse_lo


def attention_varlen_backward(grad_out, q, k, v, out, lse, lse_lo, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, scale, features, *, need_dq=True, need_dk=True, need_dv=True):
    """Gradients of :func:`attention_varlen_forward`: ``(dq, dk, dv)`` in the layouts of q, k, v, None where
    not asked for; keys of sequences with no query get zero gradients."""
    total_q, h, _ = q.shape
    nseq = cu_seqlens_q.shape[0] - 1
    empty = total_q == 0 or k.shape[0] == 0 or h == 0 or nseq == 0 or int(max_seqlen_q) == 0 or int(max_seqlen_k) == 0
    dq, dk, dv, done = _gradient_buffers(q, k, v, need_dq, need_dk, need_dv, None, None, None, empty)
    if done:
        return dq, dk, dv
    delta = torch.empty((h, total_q), device=q.device, dtype=accumulator_dtype(q.dtype))
    # The preprocess sees the packed rows as one batch element of total_q rows.
    pre = (1, total_q, _packed_strides(out), _packed_strides(grad_out), _packed_row_strides(delta),
           _packed_row_strides(lse))
    in_strides = (_packed_strides(q), _packed_strides(k), _packed_strides(v), _packed_strides(grad_out),
                  _packed_row_strides(lse), _packed_row_strides(delta))
    _backward(grad_out, q, k, v, out, lse, lse_lo, scale,
              _feature_launch(features, 0, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k),
              dq, dk, dv, delta, nseq, int(max_seqlen_q), int(max_seqlen_k), pre,
              tuple(x for st in in_strides for x in st), _packed_strides)
    return dq, dk, dv
