"""The attention kernels' shared @triton.jit helpers: scales, causal and window bounds, the feature
scalars and score modifiers, the backward's row statistics. Device code only (see ``attention.py``)."""

import triton
import triton.language as tl

from ._common import tanh


# log2(e) and ln(2): scores are kept in base 2 inside the kernels, the LSE in natural log outside.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def scales(SM_SCALE, ACC_DTYPE: tl.constexpr):
    """``(scale * log2(e), scale)`` in the accumulator dtype.

    The scale arrives as an fp64 scalar (the kernel argument is annotated "fp64"): a Python float would
    be rounded to fp32, 6e-8 relative error that an fp64 computation must not carry. ``tl.full`` makes
    it a typed scalar under the interpreter too, where plain floats would be made fp32.
    """
    s64 = tl.full([], SM_SCALE, tl.float64)
    return (s64 * LOG2E).to(ACC_DTYPE), s64.to(ACC_DTYPE)


@triton.jit
def causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Key range of a query block: ``[0, full)`` needs no mask, ``[full, hi)`` does.

    ``full`` is a multiple of BLOCK_N below which every key is inside Lk and visible to every row of the
    block; ``hi`` is one past the last key visible to any row. Negative values are clamped before the
    division (integer division of negatives rounds differently on GPU and in the interpreter).
    """
    # "+ start_m * 0": int64 like start_m, so the loop variable that multiplies strides is int64.
    lk_full = LK // BLOCK_N * BLOCK_N + start_m * 0
    if IS_CAUSAL:
        first_row_sees = tl.maximum(start_m + CAUSAL_OFFSET + 1, 0)  # keys [0, this) for row start_m
        full = tl.minimum(first_row_sees // BLOCK_N * BLOCK_N, lk_full)
        hi = tl.minimum(start_m + BLOCK_M + CAUSAL_OFFSET, LK)
    else:
        full = lk_full
        hi = LK + start_m * 0
    return full, hi


@triton.jit
def visible_tile(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of a score tile: key ``start_n + c`` exists and query ``start_m + r`` sees it.

    Computed in int32 relative to the tile (``c - r <= start_m + offset - start_n``) after clamping the
    int64 scalars into the tile's range: 64-bit per-element compares cost registers the tiles need.
    """
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    keys_left = tl.minimum(LK - start_n, BLOCK_N).to(tl.int32)
    visible = c[None, :] < keys_left
    if IS_CAUSAL:
        shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
        visible = visible & (c[None, :] - r[:, None] <= shift)
    return visible


@triton.jit
def normalized_rows(acc, l_i):
    """``(out, l_safe, empty)`` of rows with online-softmax state ``(acc, l)``: ``out = acc / l``. ``l == 0``
    exactly when a row saw no key (the row maximum contributes ``exp2(0) = 1`` otherwise): out 0 there."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc * (1.0 / l_safe)[:, None], l_safe, empty


@triton.jit
def row_lse(l_safe, empty, m_i, LSE_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(lse, lse_lo)`` in the accumulator dtype of rows with running maximum ``m`` (scaled base-2 domain)
    and sum ``l`` (:func:`normalized_rows`' ``l_safe``, ``empty``): the natural-log LSE (stored as
    ``LSE_DTYPE``; -inf for empty rows) and for the backward its rounding residual in base 2,
    ``lse2 = m + log2(l) = fl(LSE * log2(e)) + lse_lo`` to a few ulps of ``log2(l)``, not of ``m`` (with
    logits of 1e5 an fp32 LSE alone is off by up to 2^-8, which the recomputed P would inherit)."""
    log2_l = tl.math.log2(l_safe)
    m_safe = tl.where(empty, 0.0, m_i)
    lse = (m_safe + log2_l) * LN2
    hi = lse.to(LSE_DTYPE).to(ACC_DTYPE) * LOG2E
    lse_lo = tl.where(empty, 0.0, (m_safe - hi) + log2_l)  # m - hi is exact when close (Sterbenz)
    lse = tl.where(empty, float("-inf"), lse)
    return lse, lse_lo


@triton.jit
def plane_descriptor(base, rows, stride_row, COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """TMA descriptor of one (batch, head) plane of ``rows`` x ``COLS`` elements, row stride ``stride_row``,
    last dim contiguous (the launcher checked it: ``attention_configs.tma_compatible``), read in
    (BLOCK_R, BLOCK_C) boxes: rows past ``rows`` and columns past ``COLS`` read as zeros."""
    return tl.make_tensor_descriptor(base, shape=[rows, COLS], strides=[stride_row, 1], block_shape=[BLOCK_R, BLOCK_C])


@triton.jit
def visible_rows(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """:func:`visible_tile` as one compare per element against a per-row bound: key ``c`` of the tile is
    visible to row ``r`` iff ``c <= lim[r]``, ``lim = min(keys_left - 1, r + shift)``. No (BLOCK_M, BLOCK_N)
    index tile exists for the compiler to hoist out of the loop into registers (the TMA tiles need them)."""
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    keys_left = tl.minimum(LK - start_n, BLOCK_N).to(tl.int32)
    lim = tl.zeros([BLOCK_M], tl.int32) + (keys_left - 1)
    if IS_CAUSAL:
        shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
        lim = tl.minimum(lim, r + shift)
    return c[None, :] <= lim[:, None]


# ----------------------------------------------------------------------------------------------------
# Features (window, softcap, ALiBi, dropout, varlen): constexpr-gated helpers. A plain launch sets every
# feature flag False and compiles to the code it had before the features existed.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def sequence_bounds(CU_SEQLENS, b):
    """``(start, length)`` of sequence ``b`` of a packed batch: start int64 (it multiplies strides)."""
    start = tl.load(CU_SEQLENS + b)
    return start.to(tl.int64), tl.load(CU_SEQLENS + b + 1) - start


@triton.jit
def feature_scalars(SM_SCALE, SOFTCAP, ALIBI, alibi_off, DROPOUT_P, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(cap_scale, cap2, slope2, keep_scale)``: ``tanh`` argument scale ``scale / softcap`` and the
    capped score's base-2 factor ``softcap * log2(e)``; the ALiBi slope in base 2; ``1 / (1 - p)``.
    Unused ones are 0 (their flag is off)."""
    cap_scale = tl.zeros([], ACC_DTYPE)
    cap2 = tl.zeros([], ACC_DTYPE)
    slope2 = tl.zeros([], ACC_DTYPE)
    keep_scale = tl.zeros([], ACC_DTYPE)
    if HAS_SOFTCAP:
        s64 = tl.full([], SM_SCALE, tl.float64)
        c64 = tl.full([], SOFTCAP, tl.float64)
        cap_scale = (s64 / c64).to(ACC_DTYPE)
        cap2 = (c64 * LOG2E).to(ACC_DTYPE)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + alibi_off).to(ACC_DTYPE) * LOG2E
    if HAS_DROPOUT:
        keep_scale = (1.0 / (1.0 - tl.full([], DROPOUT_P, tl.float64))).to(ACC_DTYPE)
    return cap_scale, cap2, slope2, keep_scale


@triton.jit
def mod_scores(qk, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """``(s2, t)``: the scores in the scaled base-2 domain after softcap and ALiBi, and ``t = tanh(...)``
    (the softcap's derivative is ``1 - t^2``; ``t`` is ``qk`` itself without softcap, unused).

    ``s2 = log2(e) * (softcap * tanh(scale * qk / softcap) - slope * |rel|)``, ``rel = j - i - diag``
    (int32, same shape as ``qk``). The forward and both backward kernels call this one function on the
    same operands, so the recomputed P is the forward's to the last bit of ``s2``.
    """
    t = qk
    if HAS_SOFTCAP:
        t = tanh(qk * cap_scale)
        s2 = t * cap2
    else:
        s2 = qk * qk_scale
    if HAS_ALIBI:
        dist = tl.abs(rel).to(s2.dtype)
        s2 = s2 - dist * slope2
    return s2, t


@triton.jit
def window_visible_tile(visible, r, c, start_m, start_n, LEFT_OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``visible`` and the window's left bound: key ``start_n + c`` is visible to query ``start_m + r`` only
    if ``j - i >= LEFT_OFFSET`` (``r``, ``c`` broadcast to the tile, either orientation)."""
    lshift = tl.minimum(tl.maximum(start_m + LEFT_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
    return visible & (c - r >= lshift)


@triton.jit
def window_key_range(start_m, LK, CAUSAL_OFFSET, LEFT_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Key blocks of a query block under a window with a left bound (``j >= i + LEFT_OFFSET``):
    ``[lo, a)`` masked (the left edge), ``[a, b)`` unmasked, ``[b, hi)`` masked (the right edge, the end of
    the keys). Blocks outside the window are never visited: O(window) work per query block."""
    full, hi = causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
    lo = tl.maximum(start_m + LEFT_OFFSET, 0) // BLOCK_N * BLOCK_N
    # Every row of the block sees key start_n on the left iff start_n >= start_m + BLOCK_M - 1 + LEFT_OFFSET.
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + LEFT_OFFSET, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full, a), hi)
    return lo, a, b, hi


@triton.jit
def load_row_stats(LSE_blk, LSE_LO_blk, DELTA_blk, offs, rows, stride_lm, stride_dem, ACC_DTYPE: tl.constexpr):
    """``(hi, lo, delta)`` of ``rows`` query rows: the base-2 LSE as ``hi + lo`` and Delta.

    The probabilities are recomputed as ``exp2(fma(q.k, qk_scale, -hi) - lo)``: ``hi = fl(LSE * log2 e)``
    as the forward computed it and ``lo`` its stored residual, so P is as exact as the forward's however
    large the logits (a single rounded LSE would cost up to 2^-8 relative at logits near 1e5).
    Padding rows read LSE = +inf, lo = 0, Delta = 0: +inf makes the recomputed P of a padding row
    ``exp2(-inf) = 0``, so it adds nothing to dK/dV without a row mask. A -inf LSE (a row that saw no
    key) is read as +inf too: the causal mask already zeroes every P entry of such a row, and this keeps
    P finite (0, not ``exp2(+inf)``) before the mask is applied.
    """
    hi, lo = load_lse2(LSE_blk, LSE_LO_blk, offs, rows, stride_lm, ACC_DTYPE)
    delta = tl.load(DELTA_blk + offs * stride_dem, mask=offs < rows, other=0.0).to(ACC_DTYPE)
    return hi, lo, delta


@triton.jit
def load_lse2(LSE_blk, LSE_LO_blk, offs, rows, stride_lm, ACC_DTYPE: tl.constexpr):
    """``(hi, lo)`` of :func:`load_row_stats`: the base-2 LSE of ``rows`` rows as ``hi + lo``, -inf (a row
    that saw no key) and padding rows read as ``hi = +inf``, ``lo = 0``."""
    valid = offs < rows
    lse = tl.load(LSE_blk + offs * stride_lm, mask=valid, other=float("inf")).to(ACC_DTYPE)
    hi = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    lo = tl.load(LSE_LO_blk + offs * stride_lm, mask=valid, other=0.0).to(ACC_DTYPE)
    return hi, lo
