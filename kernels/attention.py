"""Flash-style attention: tiled forward that keeps only the log-sum-exp, backward that recomputes P.

Algorithm
    Forward (``attn_fwd_kernel``): one program per (query block, batch * query head). It loads its
    Q tile once and streams K/V tiles, keeping the running row maximum ``m``, the running row sum ``l``
    and the unnormalised output ``acc`` (online softmax, Milakov & Gimelshein 2018). Scores are scaled
    by ``scale * log2(e)`` so every exponential is one ``exp2`` (one MUFU op, no extra multiply).
    The key loop is split in two: blocks every row of the tile sees completely run without any mask;
    only the blocks that straddle the causal diagonal or hold the end of the keys are masked, and
    blocks entirely above the diagonal are never visited (the dQ kernel loops the same way). Writes
    O and the natural-log LSE, nothing else: no (Lq x Lk) tensor exists at any point.

    Backward (FlashAttention-2's split, Dao 2023):
    - ``attn_bwd_preprocess_kernel``: ``Delta = rowsum(dO * O)`` (= rowsum(P * dP)).
    - ``attn_bwd_dkdv_kernel``: one program per (key block, batch * kv head). dK and dV of the block
      stay in registers while the program loops over the (query head of its GQA group, query block)
      pairs that can see the keys (one flat loop; the causal mask is applied in every iteration),
      recomputing ``P^T = exp2(K Q^T * scale*log2e - LSE*log2e)``: ``dV += P^T dO``,
      ``dS^T = P^T * (V dO^T - Delta)``, ``dK += dS^T Q``.
    - ``attn_bwd_dq_kernel``: one program per (query block, batch * query head), looping over key
      blocks like the forward: ``dQ += (P * (dO V^T - Delta)) K``.
    Each gradient element is written by exactly one program, so there are no atomics and results are
    bitwise identical from run to run. GQA/MQA: kv head = q head // GROUP; dK/dV of a kv head are
    summed over its group inside one program, in a fixed order, without expanded K/V copies.

Causal masking: one runtime ``CAUSAL_OFFSET``; key j is visible to query i iff ``j <= i + offset``.
The library's bottom-right convention (FlashAttention >= 2.1, what a KV cache needs) is
``offset = Lk - Lq``; ``torch.nn.functional.scaled_dot_product_attention``'s top-left one is 0.
Rows that see no key (bottom-right with Lq > Lk) give O = 0, LSE = -inf and exactly zero gradients:
a -inf LSE is read back as +inf so the recomputed P is 0, never NaN.

Follows: FlashAttention (Dao et al. 2022) and FlashAttention-2 (Dao 2023) for the algorithm and the
backward split; the Triton fused-attention tutorial for the exp2 folding and the masked/unmasked loop
split; written from the papers, not copied.

dtypes: fp16, bf16 (fp32 accumulation; P and dS are rounded to the input dtype before their matmuls,
as FlashAttention does), fp32 (``INPUT_PRECISION``: tf32 only where torch allows it), fp64 (fp64
accumulation and exponentials). bf16 is exercised on CUDA only: Triton's interpreter cannot do bf16
arithmetic.

Shapes: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; any Lq, Lk >= 1;
D, Dv <= 256 and not necessarily powers of two (masked loads over ``BLOCK_D`` = next power of two
>= max(D, 16)). Batch/head/row offsets are int64. LSE: (B, Hq, Lq), fp32 (fp64 for fp64 inputs).

Head dims above 128 (BLOCK_D = 256): the backward computes dK and dV in two launches of the dK/dV
kernel, one accumulator each (``attention_configs.wide_heads``), and fp32 with tf32 allowed runs its
backward in full fp32 ("ieee"; ``attention_configs.backward_precision``): the configs that compile clean
for sm_80/sm_90 need both.

Tiles: ``attention_configs.py`` (the tile lists, and ``keep()``/``prune()``, which accept the tiles of the
generated ``attention_tiles.CLEAN_TILES``: those that compiled clean in the AOT report).

Features (``gradkernels.ops.attention_features`` has the semantics), each a constexpr flag of the three
kernels, off in a plain launch, which then compiles to exactly the code above (same SASS):

- ``IS_VARLEN``: packed sequences, one launch for the batch. The grid's "batch" is the sequence; each
  program reads its sequence's start and length from ``cu_seqlens`` (query/key blocks past the end do
  nothing), and the diagonal, causal offset and window are per sequence.
- ``HAS_LEFT``: a sliding window's left side (``j >= i + LEFT_OFFSET``; the right side is the causal offset).
  The forward and dQ kernels visit only key blocks that intersect the window (masked at both edges,
  unmasked between), the dK/dV kernel only query blocks that do: O(L * window) work.
- ``HAS_SOFTCAP`` / ``HAS_ALIBI``: the scores go through ``_mod_scores`` (``softcap * tanh(s / softcap)``,
  then ``- slope * |j - i - diag|``) in the base-2 domain, before the row maximum; the backward calls the
  same function on the same operands, so its P is the forward's, and multiplies dS by ``1 - tanh^2``.
  The LSE residual scheme is kept: ``P = exp2((s2 - hi) - lo)``.
- ``HAS_DROPOUT``: the keep-mask of ``kernels/dropout.py`` (a function of seed, offset, batch or sequence,
  head and positions only) applied to P after the row sum in the forward, regenerated in the backward:
  ``dV = (P Z)^T dO``, ``dP = (dO V^T) Z``; Delta = rowsum(dO * O) stays right (O already has Z).

Limits: no arbitrary attention mask, no fp8. The fp64 backward at
D > 128 needs more than the ~100 KB of shared memory of sm_86/sm_89 parts (no config fits there).
The dK/dV kernel's parallelism is B * Hkv * cdiv(Lk, BLOCK_N) programs, so MQA on very few heads and short keys may not
fill a large GPU.
"""

import triton
import triton.language as tl

from ._common import _tanh, load_tile, store_tile
from .dropout import dropout_keep, dropout_keep_block

# log2(e) and ln(2): scores are kept in base 2 inside the kernels, the LSE in natural log outside.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _scales(SM_SCALE, ACC_DTYPE: tl.constexpr):
    """``(scale * log2(e), scale)`` in the accumulator dtype.

    The scale arrives as an fp64 scalar (the kernel argument is annotated "fp64"): a Python float would
    be rounded to fp32, 6e-8 relative error that an fp64 computation must not carry. ``tl.full`` makes
    it a typed scalar under the interpreter too, where plain floats would be made fp32.
    """
    s64 = tl.full([], SM_SCALE, tl.float64)
    return (s64 * _LOG2E).to(ACC_DTYPE), s64.to(ACC_DTYPE)


@triton.jit
def _causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
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
def _visible(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
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


# ----------------------------------------------------------------------------------------------------
# Features (window, softcap, ALiBi, dropout, varlen): constexpr-gated helpers. A plain launch sets every
# feature flag False and compiles to the code it had before the features existed.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _sequence(CU_SEQLENS, b):
    """``(start, length)`` of sequence ``b`` of a packed batch: start int64 (it multiplies strides)."""
    start = tl.load(CU_SEQLENS + b)
    return start.to(tl.int64), tl.load(CU_SEQLENS + b + 1) - start


@triton.jit
def _feature_scalars(SM_SCALE, SOFTCAP, ALIBI, alibi_off, DROPOUT_P, HAS_SOFTCAP: tl.constexpr,
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
        cap2 = (c64 * _LOG2E).to(ACC_DTYPE)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + alibi_off).to(ACC_DTYPE) * _LOG2E
    if HAS_DROPOUT:
        keep_scale = (1.0 / (1.0 - tl.full([], DROPOUT_P, tl.float64))).to(ACC_DTYPE)
    return cap_scale, cap2, slope2, keep_scale


@triton.jit
def _mod_scores(qk, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """``(s2, t)``: the scores in the scaled base-2 domain after softcap and ALiBi, and ``t = tanh(...)``
    (the softcap's derivative is ``1 - t^2``; ``t`` is ``qk`` itself without softcap, unused).

    ``s2 = log2(e) * (softcap * tanh(scale * qk / softcap) - slope * |rel|)``, ``rel = j - i - diag``
    (int32, same shape as ``qk``). The forward and both backward kernels call this one function on the
    same operands, so the recomputed P is the forward's to the last bit of ``s2``.
    """
    t = qk
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_scale)
        s2 = t * cap2
    else:
        s2 = qk * qk_scale
    if HAS_ALIBI:
        dist = tl.abs(rel).to(s2.dtype)
        s2 = s2 - dist * slope2
    return s2, t


@triton.jit
def _window_visible(visible, r, c, start_m, start_n, LEFT_OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``visible`` and the window's left bound: key ``start_n + c`` is visible to query ``start_m + r`` only
    if ``j - i >= LEFT_OFFSET`` (``r``, ``c`` broadcast to the tile, either orientation)."""
    lshift = tl.minimum(tl.maximum(start_m + LEFT_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
    return visible & (c - r >= lshift)


@triton.jit
def _window_key_range(start_m, LK, CAUSAL_OFFSET, LEFT_OFFSET, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Key blocks of a query block under a window with a left bound (``j >= i + LEFT_OFFSET``):
    ``[lo, a)`` masked (the left edge), ``[a, b)`` unmasked, ``[b, hi)`` masked (the right edge, the end of
    the keys). Blocks outside the window are never visited: O(window) work per query block."""
    full, hi = _causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
    lo = tl.maximum(start_m + LEFT_OFFSET, 0) // BLOCK_N * BLOCK_N
    # Every row of the block sees key start_n on the left iff start_n >= start_m + BLOCK_M - 1 + LEFT_OFFSET.
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + LEFT_OFFSET, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full, a), hi)
    return lo, a, b, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K_bh, V_bh, start_m, lo, hi, LK, CAUSAL_OFFSET, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Online-softmax update of one query tile over key blocks ``[lo, hi)``.

    ``m_i`` is the running row maximum in the scaled base-2 domain, ``fl(max(q.k) * qk_scale)``. Each
    probability is ``exp2(fma(q.k, qk_scale, -m_i))``: the product is not rounded before the maximum is
    subtracted, so the result is accurate to the rounding of a small number however large the logits
    are, and the rounding of ``m_i`` itself is common to the whole row (it cancels in ``acc / l``).
    The backward recomputes the same expression (see ``_load_row_stats``).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_blk = K_bh + start_n * stride_kn
        v_blk = V_bh + start_n * stride_vn
        # Unmasked blocks bound the rows by the constexpr BLOCK_N: the row mask folds away.
        rows = LK - start_n if MASKED else BLOCK_N
        k = load_tile(k_blk, offs_n, offs_d, stride_kn, stride_kd, rows, HEAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        if MASKED:
            visible = _visible(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            qk = tl.where(visible, qk, float("-inf"))
            # qk_scale > 0 (the launcher folds the sign of the scale into Q), so scaling keeps the order.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # A row with nothing visible yet keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
        p = tl.math.exp2(tl.fma(qk, qk_scale, -m_sub[:, None]))
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_blk, offs_n, offs_dv, stride_vn, stride_vd, rows, HEAD_DV)
        acc = acc * alpha[:, None]
        # P rounded to the input dtype for the tensor-core matmul (fp32/fp64: no rounding).
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner_features(
    acc, l_i, m_i, q, K_bh, V_bh, start_m, lo, hi, LK, CAUSAL_OFFSET, LEFT_OFFSET, diag, qk_scale,
    cap_scale, cap2, slope2, seed, rng_offset, bh, THRESHOLD,
    stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """:func:`_attn_fwd_inner` with the features: scores through :func:`_mod_scores` (``m_i`` is then the
    running maximum of ``s2`` and ``p = exp2(s2 - m_i)``), the window's left edge in the mask, and the
    dropout keep-mask on P after the row sum (``l`` sums the undropped P: dropout acts after the softmax)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_blk = K_bh + start_n * stride_kn
        v_blk = V_bh + start_n * stride_vn
        rows = LK - start_n if MASKED else BLOCK_N
        k = load_tile(k_blk, offs_n, offs_d, stride_kn, stride_kd, rows, HEAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        rel = None
        if HAS_ALIBI:
            rel = offs_n[None, :] - offs_m[:, None] + (start_n - start_m - diag).to(tl.int32)
        s2, _ = _mod_scores(qk, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            visible = _visible(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            if HAS_LEFT:
                visible = _window_visible(visible, offs_m[:, None], offs_n[None, :], start_m, start_n, LEFT_OFFSET,
                                          BLOCK_M, BLOCK_N)
            s2 = tl.where(visible, s2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            m_sub = m_new
        p = tl.math.exp2(s2 - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep_block(seed, rng_offset, bh, start_m + offs_m, start_n, THRESHOLD, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = load_tile(v_blk, offs_n, offs_dv, stride_vn, stride_vd, rows, HEAD_DV)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["LQ", "LK", "CAUSAL_OFFSET", "LEFT_OFFSET", "DIAG", "THRESHOLD"])
def attn_fwd_kernel(
    # pointers
    Q, K, V, O, LSE, LSE_LO,
    # scalars
    SM_SCALE: "fp64",
    # sizes
    H, GROUP, LQ, LK, CAUSAL_OFFSET,
    LQ_BUCKET, LK_BUCKET,  # autotune keys only
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,  # LSE and LSE_LO
    # features (pointers None and scalars 0 when their flag is off)
    CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG,
    SOFTCAP: "fp64", DROPOUT_P: "fp64", LEFT_OFFSET, DIAG, THRESHOLD,
    stride_ab, stride_ah,
    # constexpr flags
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    # feature flags
    IS_VARLEN: tl.constexpr = False, HAS_LEFT: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
):
    """O = softmax(Q K^T * scale) V and the natural-log LSE of each row.

    Grid: (cdiv(LQ, BLOCK_M) * B * H,), H query heads; kv head = query head // GROUP.

    Features (see :mod:`gradkernels.ops.attention_features`): ``IS_VARLEN``: B sequences packed along the
    row dimension (batch strides unused), sequence ``b`` is rows ``[CU_SEQLENS_Q[b], CU_SEQLENS_Q[b + 1])``,
    LQ/LK are the longest lengths (the grid), and ``CAUSAL_OFFSET``, ``LEFT_OFFSET`` and ``DIAG`` are relative
    to each sequence's ``Lk - Lq``. ``HAS_LEFT``: keys ``j < i + LEFT_OFFSET`` are invisible (the window's
    left side; the right side is ``IS_CAUSAL``'s ``CAUSAL_OFFSET``). ``HAS_SOFTCAP``, ``HAS_ALIBI``
    (slope at ``ALIBI + b * stride_ab + h * stride_ah``, distance ``|j - i - DIAG|``), ``HAS_DROPOUT``
    (``RNG`` = int64 (seed, offset), ``THRESHOLD`` the keep threshold's bits, ``DROPOUT_P`` = p).
    """
    tl.static_assert(BLOCK_D >= HEAD_D, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_DV >= HEAD_DV, "BLOCK_DV must cover the value head dim")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs 16 at least")
    ACC_DTYPE: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32

    num_m = tl.cdiv(LQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m  # the longest rows (most key blocks) start first
    pid_bh = (pid // num_m).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    start_m = pid_m.to(tl.int64) * BLOCK_M

    FEATURES: tl.constexpr = IS_VARLEN or HAS_LEFT or HAS_SOFTCAP or HAS_ALIBI or HAS_DROPOUT
    if IS_VARLEN:
        q0, LQ = _sequence(CU_SEQLENS_Q, b)
        k0, LK = _sequence(CU_SEQLENS_K, b)
        seq_diag = LK - LQ
        CAUSAL_OFFSET += seq_diag
        LEFT_OFFSET += seq_diag
        DIAG += seq_diag
        Q_blk = Q + q0 * stride_qm + h * stride_qh + start_m * stride_qm
        K_bh = K + k0 * stride_kn + kvh * stride_kh
        V_bh = V + k0 * stride_vn + kvh * stride_vh
    else:
        Q_blk = Q + b * stride_qb + h * stride_qh + start_m * stride_qm
        K_bh = K + b * stride_kb + kvh * stride_kh
        V_bh = V + b * stride_vb + kvh * stride_vh

    offs_m_local = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q_blk, offs_m_local, offs_d, stride_qm, stride_qd, LQ - start_m, HEAD_D)
    qk_scale, _ = _scales(SM_SCALE, ACC_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)

    if FEATURES:
        cap_scale, cap2, slope2, keep_scale = _feature_scalars(
            SM_SCALE, SOFTCAP, ALIBI, b * stride_ab + h * stride_ah, DROPOUT_P, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ACC_DTYPE)
        seed = 0
        rng_offset = 0
        if HAS_DROPOUT:
            seed = tl.load(RNG)
            rng_offset = tl.load(RNG + 1)
        bh = pid_bh  # = b * H + h: the dropout mask's (batch or sequence, head) word
        if HAS_LEFT:
            lo, a, full, hi = _window_key_range(start_m, LK, CAUSAL_OFFSET, LEFT_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        else:
            full, hi = _causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            lo = start_m * 0
            a = lo
        if IS_VARLEN:
            hi = tl.where(start_m < LQ, hi, 0)  # a query block past its sequence's end: no work
            a = tl.minimum(a, hi)
            full = tl.minimum(full, hi)
        if HAS_LEFT:
            acc, l_i, m_i = _attn_fwd_inner_features(
                acc, l_i, m_i, q, K_bh, V_bh, start_m, lo, a, LK, CAUSAL_OFFSET, LEFT_OFFSET, DIAG, qk_scale,
                cap_scale, cap2, slope2, seed, rng_offset, bh, THRESHOLD, stride_kn, stride_kd, stride_vn, stride_vd,
                True, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
                HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
            )
        acc, l_i, m_i = _attn_fwd_inner_features(
            acc, l_i, m_i, q, K_bh, V_bh, start_m, a, full, LK, CAUSAL_OFFSET, LEFT_OFFSET, DIAG, qk_scale,
            cap_scale, cap2, slope2, seed, rng_offset, bh, THRESHOLD, stride_kn, stride_kd, stride_vn, stride_vd,
            False, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        acc, l_i, m_i = _attn_fwd_inner_features(
            acc, l_i, m_i, q, K_bh, V_bh, start_m, full, hi, LK, CAUSAL_OFFSET, LEFT_OFFSET, DIAG, qk_scale,
            cap_scale, cap2, slope2, seed, rng_offset, bh, THRESHOLD, stride_kn, stride_kd, stride_vn, stride_vd,
            True, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        if HAS_DROPOUT:
            acc = acc * keep_scale
    else:
        full, hi = _causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, start_m, 0, full, LK, CAUSAL_OFFSET, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            False, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, start_m, full, hi, LK, CAUSAL_OFFSET, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            True, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )

    # l == 0 exactly when the row saw no key (the row maximum contributes exp2(0) = 1 otherwise).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    if IS_VARLEN:
        O_blk = O + q0 * stride_om + h * stride_oh + start_m * stride_om
    else:
        O_blk = O + b * stride_ob + h * stride_oh + start_m * stride_om
    store_tile(O_blk, out.to(O.dtype.element_ty), offs_m_local, offs_dv, stride_om, stride_od,
               LQ - start_m, HEAD_DV)
    # The LSE in natural log for the caller, and for the backward its rounding residual in base 2:
    # lse2 = m + log2(l) = fl(LSE * log2(e)) + LSE_LO to a few ulps of log2(l), not of m. With logits
    # of 1e5 an fp32 LSE alone is off by up to 0.004 (2^-8), which the recomputed P would inherit.
    log2_l = tl.math.log2(l_safe)
    m_safe = tl.where(empty, 0.0, m_i)
    lse = (m_safe + log2_l) * _LN2
    hi = lse.to(LSE.dtype.element_ty).to(ACC_DTYPE) * _LOG2E
    lse_lo = tl.where(empty, 0.0, (m_safe - hi) + log2_l)  # m - hi is exact when close (Sterbenz)
    lse = tl.where(empty, float("-inf"), lse)
    row_mask = offs_m_local < LQ - start_m
    if IS_VARLEN:
        row_off = q0 * stride_lm + h * stride_lh + (start_m + offs_m_local) * stride_lm
    else:
        row_off = b * stride_lb + h * stride_lh + (start_m + offs_m_local) * stride_lm
    tl.store(LSE + row_off, lse.to(LSE.dtype.element_ty), mask=row_mask)
    tl.store(LSE_LO + row_off, lse_lo.to(LSE_LO.dtype.element_ty), mask=row_mask)


@triton.jit
def attn_bwd_preprocess_kernel(
    # pointers
    O, DO, DELTA,
    # sizes
    H, LQ,
    # strides
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_deb, stride_deh, stride_dem,
    # constexpr
    HEAD_DV: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``Delta = rowsum(dO * O)`` in the accumulator dtype; equals rowsum(P * dP) of the backward.

    Grid: (cdiv(LQ, BLOCK_M) * B * H,).
    """
    ACC_DTYPE: tl.constexpr = tl.float64 if O.dtype.element_ty == tl.float64 else tl.float32
    num_m = tl.cdiv(LQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_bh = (pid // num_m).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    start_m = (pid % num_m).to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = load_tile(O + b * stride_ob + h * stride_oh + start_m * stride_om, offs_m, offs_dv,
                  stride_om, stride_od, LQ - start_m, HEAD_DV)
    do = load_tile(DO + b * stride_dob + h * stride_doh + start_m * stride_dom, offs_m, offs_dv,
                   stride_dom, stride_dod, LQ - start_m, HEAD_DV)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(DELTA + b * stride_deb + h * stride_deh + (start_m + offs_m) * stride_dem, delta,
             mask=offs_m < LQ - start_m)


@triton.jit
def _load_row_stats(LSE_blk, LSE_LO_blk, DELTA_blk, offs, rows, stride_lm, stride_dem, ACC_DTYPE: tl.constexpr):
    """``(hi, lo, delta)`` of ``rows`` query rows: the base-2 LSE as ``hi + lo`` and Delta.

    The probabilities are recomputed as ``exp2(fma(q.k, qk_scale, -hi) - lo)``: ``hi = fl(LSE * log2 e)``
    as the forward computed it and ``lo`` its stored residual, so P is as exact as the forward's however
    large the logits (a single rounded LSE would cost up to 2^-8 relative at logits near 1e5).
    Padding rows read LSE = +inf, lo = 0, Delta = 0: +inf makes the recomputed P of a padding row
    ``exp2(-inf) = 0``, so it adds nothing to dK/dV without a row mask. A -inf LSE (a row that saw no
    key) is read as +inf too: the causal mask already zeroes every P entry of such a row, and this keeps
    P finite (0, not ``exp2(+inf)``) before the mask is applied.
    """
    valid = offs < rows
    lse = tl.load(LSE_blk + offs * stride_lm, mask=valid, other=float("inf")).to(ACC_DTYPE)
    hi = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    lo = tl.load(LSE_LO_blk + offs * stride_lm, mask=valid, other=0.0).to(ACC_DTYPE)
    delta = tl.load(DELTA_blk + offs * stride_dem, mask=valid, other=0.0).to(ACC_DTYPE)
    return hi, lo, delta


@triton.jit
def _attn_bwd_dkdv_features(
    Q, K, V, DO, LSE, LSE_LO, DELTA, DK, DV, SM_SCALE, HKV, GROUP, LQ, LK, CAUSAL_OFFSET, b, kvh, pid_bh, start_n,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm, stride_deb, stride_deh, stride_dem,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, SOFTCAP, DROPOUT_P, LEFT_OFFSET, DIAG, THRESHOLD, stride_ab, stride_ah,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The body of :func:`attn_bwd_dkdv_kernel` for a launch with features (same loop, same outputs).

    Query blocks: from the first that holds a row seeing key ``start_n`` (the right edge) to the last that
    holds a row seeing key ``start_n + BLOCK_N - 1`` (the window's left edge), every iteration masked.
    P^T is recomputed from :func:`_mod_scores`, as the forward computed it; dropout: ``dV = (P Z)^T dO``,
    ``dP = (dO V^T) Z`` with the forward's keep-mask ``Z`` (scaled by ``1 / (1 - p)``); softcap: ``dS``
    times ``1 - t^2``.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    h0 = kvh * GROUP
    if IS_VARLEN:
        q0, LQ = _sequence(CU_SEQLENS_Q, b)
        k0, LK = _sequence(CU_SEQLENS_K, b)
        seq_diag = LK - LQ
        CAUSAL_OFFSET += seq_diag
        LEFT_OFFSET += seq_diag
        DIAG += seq_diag
        K_blk = K + k0 * stride_kn + kvh * stride_kh + start_n * stride_kn
        V_blk = V + k0 * stride_vn + kvh * stride_vh + start_n * stride_vn
        Q_b = Q + q0 * stride_qm + h0 * stride_qh
        DO_b = DO + q0 * stride_dom + h0 * stride_doh
        LSE_b = LSE + q0 * stride_lm + h0 * stride_lh
        LSE_LO_b = LSE_LO + q0 * stride_lm + h0 * stride_lh
        DELTA_b = DELTA + q0 * stride_dem + h0 * stride_deh
        DK_blk = DK + k0 * stride_dkn + kvh * stride_dkh + start_n * stride_dkn
        DV_blk = DV + k0 * stride_dvn + kvh * stride_dvh + start_n * stride_dvn
    else:
        K_blk = K + b * stride_kb + kvh * stride_kh + start_n * stride_kn
        V_blk = V + b * stride_vb + kvh * stride_vh + start_n * stride_vn
        Q_b = Q + b * stride_qb + h0 * stride_qh
        DO_b = DO + b * stride_dob + h0 * stride_doh
        LSE_b = LSE + b * stride_lb + h0 * stride_lh
        LSE_LO_b = LSE_LO + b * stride_lb + h0 * stride_lh
        DELTA_b = DELTA + b * stride_deb + h0 * stride_deh
        DK_blk = DK + b * stride_dkb + kvh * stride_dkh + start_n * stride_dkn
        DV_blk = DV + b * stride_dvb + kvh * stride_dvh + start_n * stride_dvn
    k = load_tile(K_blk, offs_n, offs_d, stride_kn, stride_kd, LK - start_n, HEAD_D)
    v = load_tile(V_blk, offs_n, offs_dv, stride_vn, stride_vd, LK - start_n, HEAD_DV)
    qk_scale, sm_scale = _scales(SM_SCALE, ACC_DTYPE)
    cap_scale, cap2, slope2, keep_scale = _feature_scalars(
        SM_SCALE, SOFTCAP, ALIBI, b * stride_ab + h0 * stride_ah, DROPOUT_P, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        ACC_DTYPE)
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    bh0 = pid_bh * GROUP  # = b * H + h0, the dropout word of the group's first query head

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    if IS_CAUSAL:
        lo = tl.minimum(tl.maximum(start_n - CAUSAL_OFFSET, 0) // BLOCK_M * BLOCK_M, LQ)
    else:
        lo = start_n * 0
    # One past the last query row that sees a key of the block: j >= i + LEFT_OFFSET <=> i <= j - LEFT_OFFSET.
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - LEFT_OFFSET, 0), LQ)
    else:
        hi = start_n * 0 + LQ
    if IS_VARLEN:
        hi = tl.where(start_n < LK, hi, 0)  # a key block past its sequence's end: no work
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M).to(tl.int32)
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        start_m = lo + (it - g * n_blocks) * BLOCK_M
        rows = LQ - start_m
        q = load_tile(Q_b + g * stride_qh + start_m * stride_qm, offs_m, offs_d, stride_qm, stride_qd,
                      rows, HEAD_D)
        do = load_tile(DO_b + g * stride_doh + start_m * stride_dom, offs_m, offs_dv, stride_dom, stride_dod,
                       rows, HEAD_DV)
        row = g * stride_lh + start_m * stride_lm
        row_hi, row_lo, delta = _load_row_stats(LSE_b + row, LSE_LO_b + row,
                                                DELTA_b + g * stride_deh + start_m * stride_dem,
                                                offs_m, rows, stride_lm, stride_dem, ACC_DTYPE)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        rel = None
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + b * stride_ab + (h0 + g) * stride_ah).to(ACC_DTYPE) * _LOG2E
            rel = offs_n[:, None] - offs_m[None, :] + (start_n - start_m - DIAG).to(tl.int32)
        s2, t = _mod_scores(qk_t, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
        p_t = tl.math.exp2((s2 - row_hi[None, :]) - row_lo[None, :])
        if IS_CAUSAL or HAS_LEFT:
            visible = offs_n[:, None] >= 0
            if IS_CAUSAL:
                shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
                visible = visible & (offs_n[:, None] - offs_m[None, :] <= shift)
            if HAS_LEFT:
                visible = _window_visible(visible, offs_m[None, :], offs_n[:, None], start_m, start_n, LEFT_OFFSET,
                                          BLOCK_M, BLOCK_N)
            p_t = tl.where(visible, p_t, 0.0)
        if HAS_DROPOUT:
            keep_t = dropout_keep(seed, rng_offset, bh0 + g, (start_m + offs_m)[None, :], (start_n + offs_n)[:, None],
                                  THRESHOLD)
        if COMPUTE_DV:
            pz_t = p_t
            if HAS_DROPOUT:
                pz_t = tl.where(keep_t, p_t, 0.0)
            dv = tl.dot(pz_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if COMPUTE_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_DROPOUT:
                dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t * t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if COMPUTE_DK:
        store_tile(DK_blk, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd,
                   LK - start_n, HEAD_D)
    if COMPUTE_DV:
        if HAS_DROPOUT:
            dv = dv * keep_scale
        store_tile(DV_blk, dv.to(DV.dtype.element_ty), offs_n, offs_dv, stride_dvn, stride_dvd,
                   LK - start_n, HEAD_DV)


@triton.jit(do_not_specialize=["LQ", "LK", "CAUSAL_OFFSET", "LEFT_OFFSET", "DIAG", "THRESHOLD"])
def attn_bwd_dkdv_kernel(
    # pointers
    Q, K, V, DO, LSE, LSE_LO, DELTA, DK, DV,
    # scalars
    SM_SCALE: "fp64",
    # sizes
    HKV, GROUP, LQ, LK, CAUSAL_OFFSET,
    LQ_BUCKET, LK_BUCKET,  # autotune keys only
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_deb, stride_deh, stride_dem,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    # features (pointers None and scalars 0 when their flag is off; see attn_fwd_kernel)
    CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG,
    SOFTCAP: "fp64", DROPOUT_P: "fp64", LEFT_OFFSET, DIAG, THRESHOLD,
    stride_ab, stride_ah,
    # constexpr flags
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    # feature flags
    IS_VARLEN: tl.constexpr = False, HAS_LEFT: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
):
    """dK, dV of one key block of one kv head, summed over the GROUP query heads that read it.

    Grid: (cdiv(LK, BLOCK_N) * B * HKV,). Query head ``kvh * GROUP + g`` reads kv head ``kvh``; LSE and
    Delta are indexed by query head (B, HKV * GROUP, LQ).

    One flat loop over (query head of the group, query block) pairs rather than two nested loops: the
    nest cost registers (spills at D = 128 on sm_90) and restarted the load pipeline at every head.
    Scores are transposed (keys x queries) so dK and dV come out of plain ``tl.dot`` s. Padding query
    rows need no mask: their Q and dO load as 0 and their LSE as +inf, so P^T is 0 there. Query blocks
    that see none of the keys are skipped; with causal masking the others are all masked (cheap next to
    the four matmuls of an iteration, and one loop body instead of two keeps registers free).
    """
    tl.static_assert(BLOCK_D >= HEAD_D, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_DV >= HEAD_DV, "BLOCK_DV must cover the value head dim")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs 16 at least")
    ACC_DTYPE: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32

    num_n = tl.cdiv(LK, BLOCK_N)
    pid = tl.program_id(0)
    pid_bh = (pid // num_n).to(tl.int64)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    start_n = (pid % num_n).to(tl.int64) * BLOCK_N

    FEATURES: tl.constexpr = IS_VARLEN or HAS_LEFT or HAS_SOFTCAP or HAS_ALIBI or HAS_DROPOUT
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if FEATURES:
        _attn_bwd_dkdv_features(
            Q, K, V, DO, LSE, LSE_LO, DELTA, DK, DV, SM_SCALE, HKV, GROUP, LQ, LK, CAUSAL_OFFSET, b, kvh, pid_bh,
            start_n, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_lb, stride_lh, stride_lm, stride_deb, stride_deh, stride_dem,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, SOFTCAP, DROPOUT_P, LEFT_OFFSET, DIAG, THRESHOLD,
            stride_ab, stride_ah,
            HEAD_D, HEAD_DV, IS_CAUSAL, COMPUTE_DK, COMPUTE_DV, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
            BLOCK_DV, IS_VARLEN, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, ACC_DTYPE,
        )
    else:
        k = load_tile(K + b * stride_kb + kvh * stride_kh + start_n * stride_kn, offs_n, offs_d,
                      stride_kn, stride_kd, LK - start_n, HEAD_D)
        v = load_tile(V + b * stride_vb + kvh * stride_vh + start_n * stride_vn, offs_n, offs_dv,
                      stride_vn, stride_vd, LK - start_n, HEAD_DV)
        qk_scale, sm_scale = _scales(SM_SCALE, ACC_DTYPE)

        # The group's first query head; head g of the group is at + g * stride_*h.
        h0 = kvh * GROUP
        Q_b = Q + b * stride_qb + h0 * stride_qh
        DO_b = DO + b * stride_dob + h0 * stride_doh
        LSE_b = LSE + b * stride_lb + h0 * stride_lh
        LSE_LO_b = LSE_LO + b * stride_lb + h0 * stride_lh
        DELTA_b = DELTA + b * stride_deb + h0 * stride_deh

        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
        if IS_CAUSAL:
            # First query block holding a row that sees key start_n (j <= i + offset <=> i >= j - offset);
            # clamped before dividing (negative division rounds differently on GPU and in the interpreter).
            lo = tl.minimum(tl.maximum(start_n - CAUSAL_OFFSET, 0) // BLOCK_M * BLOCK_M, LQ)
        else:
            lo = start_n * 0
        n_blocks = tl.cdiv(LQ - lo, BLOCK_M).to(tl.int32)
        for it in range(0, GROUP * n_blocks):
            g = it // n_blocks
            start_m = lo + (it - g * n_blocks) * BLOCK_M
            rows = LQ - start_m
            q = load_tile(Q_b + g * stride_qh + start_m * stride_qm, offs_m, offs_d, stride_qm, stride_qd,
                          rows, HEAD_D)
            do = load_tile(DO_b + g * stride_doh + start_m * stride_dom, offs_m, offs_dv, stride_dom, stride_dod,
                           rows, HEAD_DV)
            row = g * stride_lh + start_m * stride_lm
            row_hi, row_lo, delta = _load_row_stats(LSE_b + row, LSE_LO_b + row,
                                                    DELTA_b + g * stride_deh + start_m * stride_dem,
                                                    offs_m, rows, stride_lm, stride_dem, ACC_DTYPE)
            qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            p_t = tl.math.exp2(tl.fma(qk_t, qk_scale, -row_hi[None, :]) - row_lo[None, :])
            if IS_CAUSAL:
                # Key start_n + c is visible to query start_m + r iff c - r <= shift (int32, see _visible).
                shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
                p_t = tl.where(offs_n[:, None] - offs_m[None, :] <= shift, p_t, 0.0)
            if COMPUTE_DV:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if COMPUTE_DK:
                dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

        if COMPUTE_DK:
            store_tile(DK + b * stride_dkb + kvh * stride_dkh + start_n * stride_dkn,
                       (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd,
                       LK - start_n, HEAD_D)
        if COMPUTE_DV:
            store_tile(DV + b * stride_dvb + kvh * stride_dvh + start_n * stride_dvn,
                       dv.to(DV.dtype.element_ty), offs_n, offs_dv, stride_dvn, stride_dvd,
                       LK - start_n, HEAD_DV)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, lo, hi, LK, CAUSAL_OFFSET, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Accumulate one query tile's dQ over key blocks ``[lo, hi)``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        rows = LK - start_n if MASKED else BLOCK_N
        k = load_tile(K_bh + start_n * stride_kn, offs_n, offs_d, stride_kn, stride_kd, rows, HEAD_D)
        v = load_tile(V_bh + start_n * stride_vn, offs_n, offs_dv, stride_vn, stride_vd, rows, HEAD_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
        p = tl.math.exp2(tl.fma(qk, qk_scale, -row_hi[:, None]) - row_lo[:, None])
        if MASKED:
            # Keys past LK are masked too: their zero K gives s = 0 and exp2(-lse) can overflow.
            visible = _visible(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def _attn_bwd_dq_inner_features(
    dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, lo, hi, LK, CAUSAL_OFFSET, LEFT_OFFSET, diag, qk_scale,
    cap_scale, cap2, slope2, keep_scale, seed, rng_offset, bh, THRESHOLD,
    stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """:func:`_attn_bwd_dq_inner` with the features (see :func:`_attn_bwd_dkdv_features`)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        rows = LK - start_n if MASKED else BLOCK_N
        k = load_tile(K_bh + start_n * stride_kn, offs_n, offs_d, stride_kn, stride_kd, rows, HEAD_D)
        v = load_tile(V_bh + start_n * stride_vn, offs_n, offs_dv, stride_vn, stride_vd, rows, HEAD_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
        rel = None
        if HAS_ALIBI:
            rel = offs_n[None, :] - offs_m[:, None] + (start_n - start_m - diag).to(tl.int32)
        s2, t = _mod_scores(qk, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
        p = tl.math.exp2((s2 - row_hi[:, None]) - row_lo[:, None])
        if MASKED:
            visible = _visible(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            if HAS_LEFT:
                visible = _window_visible(visible, offs_m[:, None], offs_n[None, :], start_m, start_n, LEFT_OFFSET,
                                          BLOCK_M, BLOCK_N)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
        if HAS_DROPOUT:
            keep = dropout_keep_block(seed, rng_offset, bh, start_m + offs_m, start_n, THRESHOLD, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit(do_not_specialize=["LQ", "LK", "CAUSAL_OFFSET", "LEFT_OFFSET", "DIAG", "THRESHOLD"])
def attn_bwd_dq_kernel(
    # pointers
    Q, K, V, DO, LSE, LSE_LO, DELTA, DQ,
    # scalars
    SM_SCALE: "fp64",
    # sizes
    H, GROUP, LQ, LK, CAUSAL_OFFSET,
    LQ_BUCKET, LK_BUCKET,  # autotune keys only
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_deb, stride_deh, stride_dem,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    # features (pointers None and scalars 0 when their flag is off; see attn_fwd_kernel)
    CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG,
    SOFTCAP: "fp64", DROPOUT_P: "fp64", LEFT_OFFSET, DIAG, THRESHOLD,
    stride_ab, stride_ah,
    # constexpr flags
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    # feature flags
    IS_VARLEN: tl.constexpr = False, HAS_LEFT: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
):
    """dQ of one query block of one query head. Grid: (cdiv(LQ, BLOCK_M) * B * H,)."""
    tl.static_assert(BLOCK_D >= HEAD_D, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_DV >= HEAD_DV, "BLOCK_DV must cover the value head dim")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs 16 at least")
    ACC_DTYPE: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32

    num_m = tl.cdiv(LQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m  # the longest rows first, as in the forward
    pid_bh = (pid // num_m).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    start_m = pid_m.to(tl.int64) * BLOCK_M

    FEATURES: tl.constexpr = IS_VARLEN or HAS_LEFT or HAS_SOFTCAP or HAS_ALIBI or HAS_DROPOUT
    offs_m_local = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if FEATURES:
        if IS_VARLEN:
            q0, LQ = _sequence(CU_SEQLENS_Q, b)
            k0, LK = _sequence(CU_SEQLENS_K, b)
            seq_diag = LK - LQ
            CAUSAL_OFFSET += seq_diag
            LEFT_OFFSET += seq_diag
            DIAG += seq_diag
            Q_blk = Q + q0 * stride_qm + h * stride_qh + start_m * stride_qm
            DO_blk = DO + q0 * stride_dom + h * stride_doh + start_m * stride_dom
            row = q0 * stride_lm + h * stride_lh + start_m * stride_lm
            DELTA_blk = DELTA + q0 * stride_dem + h * stride_deh + start_m * stride_dem
            K_bh = K + k0 * stride_kn + kvh * stride_kh
            V_bh = V + k0 * stride_vn + kvh * stride_vh
            DQ_blk = DQ + q0 * stride_dqm + h * stride_dqh + start_m * stride_dqm
        else:
            Q_blk = Q + b * stride_qb + h * stride_qh + start_m * stride_qm
            DO_blk = DO + b * stride_dob + h * stride_doh + start_m * stride_dom
            row = b * stride_lb + h * stride_lh + start_m * stride_lm
            DELTA_blk = DELTA + b * stride_deb + h * stride_deh + start_m * stride_dem
            K_bh = K + b * stride_kb + kvh * stride_kh
            V_bh = V + b * stride_vb + kvh * stride_vh
            DQ_blk = DQ + b * stride_dqb + h * stride_dqh + start_m * stride_dqm
        rows = LQ - start_m
        q = load_tile(Q_blk, offs_m_local, offs_d, stride_qm, stride_qd, rows, HEAD_D)
        do = load_tile(DO_blk, offs_m_local, offs_dv, stride_dom, stride_dod, rows, HEAD_DV)
        row_hi, row_lo, delta = _load_row_stats(LSE + row, LSE_LO + row, DELTA_blk, offs_m_local, rows, stride_lm,
                                                stride_dem, ACC_DTYPE)
        qk_scale, sm_scale = _scales(SM_SCALE, ACC_DTYPE)
        cap_scale, cap2, slope2, keep_scale = _feature_scalars(
            SM_SCALE, SOFTCAP, ALIBI, b * stride_ab + h * stride_ah, DROPOUT_P, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ACC_DTYPE)
        seed = 0
        rng_offset = 0
        if HAS_DROPOUT:
            seed = tl.load(RNG)
            rng_offset = tl.load(RNG + 1)
        bh = pid_bh
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        if HAS_LEFT:
            lo, a, full, hi = _window_key_range(start_m, LK, CAUSAL_OFFSET, LEFT_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        else:
            full, hi = _causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            lo = start_m * 0
            a = lo
        if IS_VARLEN:
            hi = tl.where(start_m < LQ, hi, 0)
            a = tl.minimum(a, hi)
            full = tl.minimum(full, hi)
        if HAS_LEFT:
            dq = _attn_bwd_dq_inner_features(
                dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, lo, a, LK, CAUSAL_OFFSET, LEFT_OFFSET, DIAG,
                qk_scale, cap_scale, cap2, slope2, keep_scale, seed, rng_offset, bh, THRESHOLD,
                stride_kn, stride_kd, stride_vn, stride_vd,
                True, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
                HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
            )
        dq = _attn_bwd_dq_inner_features(
            dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, a, full, LK, CAUSAL_OFFSET, LEFT_OFFSET, DIAG,
            qk_scale, cap_scale, cap2, slope2, keep_scale, seed, rng_offset, bh, THRESHOLD,
            stride_kn, stride_kd, stride_vn, stride_vd,
            False, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        dq = _attn_bwd_dq_inner_features(
            dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, full, hi, LK, CAUSAL_OFFSET, LEFT_OFFSET, DIAG,
            qk_scale, cap_scale, cap2, slope2, keep_scale, seed, rng_offset, bh, THRESHOLD,
            stride_kn, stride_kd, stride_vn, stride_vd,
            True, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
            HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        store_tile(DQ_blk, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m_local, offs_d, stride_dqm, stride_dqd,
                   rows, HEAD_D)
    else:
        rows = LQ - start_m
        q = load_tile(Q + b * stride_qb + h * stride_qh + start_m * stride_qm, offs_m_local, offs_d,
                      stride_qm, stride_qd, rows, HEAD_D)
        do = load_tile(DO + b * stride_dob + h * stride_doh + start_m * stride_dom, offs_m_local, offs_dv,
                       stride_dom, stride_dod, rows, HEAD_DV)
        row = b * stride_lb + h * stride_lh + start_m * stride_lm
        row_hi, row_lo, delta = _load_row_stats(LSE + row, LSE_LO + row,
                                                DELTA + b * stride_deb + h * stride_deh + start_m * stride_dem,
                                                offs_m_local, rows, stride_lm, stride_dem, ACC_DTYPE)
        qk_scale, sm_scale = _scales(SM_SCALE, ACC_DTYPE)
        K_bh = K + b * stride_kb + kvh * stride_kh
        V_bh = V + b * stride_vb + kvh * stride_vh

        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        full, hi = _causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, 0, full, LK, CAUSAL_OFFSET, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            False, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, start_m, full, hi, LK, CAUSAL_OFFSET, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            True, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        store_tile(DQ + b * stride_dqb + h * stride_dqh + start_m * stride_dqm,
                   (dq * sm_scale).to(DQ.dtype.element_ty), offs_m_local, offs_d, stride_dqm, stride_dqd,
                   rows, HEAD_D)
