"""Decoding attention: few query rows against a long key cache, split across programs (flash-decoding).

Algorithm
    ``attn_decode_kernel``: the query rows of all the query heads of one kv head are packed into the
    rows of one tile (GQA packing): packed row ``r`` is query head ``kv_head * GROUP + r // LQ`` at
    position ``r % LQ``. So each K/V block is read once per kv head and row block, not once per query
    head, and a single decoded token of a 32/8 GQA model fills 4 rows of a 16-row tile instead of 1.
    The keys are split into ``NUM_SPLITS`` contiguous chunks of ``KEYS_PER_SPLIT`` (a multiple of
    ``BLOCK_N``), one program each, so ``B * Hkv`` kv heads still fill the GPU (Dao et al., "Flash-Decoding
    for long-context inference", 2023). Each program runs the forward's online softmax over its chunk
    (transposed: keys and Dv in the MMAs' M dimension, the packed rows in N, so Hopper's 64-row wgmma runs
    with as few as 16 packed rows) and writes its unnormalised output rows with their running maximum ``m`` (scaled base-2 domain) and
    row sum ``l``, in the accumulator dtype.

    ``attn_decode_combine_kernel``: merges a row's partials in split order (fixed, so the result is
    bitwise reproducible): ``m = max m_s``, ``l = sum l_s 2^(m_s - m)``, ``acc = sum acc_s 2^(m_s - m)``, then
    the forward's epilogue (``out = acc / l``, the natural-log LSE and its base-2 residual), so the
    backward kernels take the result as they take the forward's. With one split the merge is exact
    (``2^0 = 1``, ``2^-inf = 0``).

Causal masking as in ``attention.py`` (key j visible to query i iff ``j <= i + CAUSAL_OFFSET``): key blocks
every packed row sees completely (``j <= CAUSAL_OFFSET``) run unmasked; the rest compare each score with
its row's bound. Rows that see no key give O = 0, LSE = -inf, as the forward.

dtypes, head dims and strides: as the forward (fp16, bf16, fp32 with ``INPUT_PRECISION``, fp64; D, Dv <=
256; any strides). Tiles are fixed per launch by ``attention_configs.decode_config``.
"""

import triton
import triton.language as tl

from .attention_common import scales, normalized_rows, row_lse


@triton.jit
def _decode_inner(acc, l_i, m_i, q, K_bh, V_bh, pos, lo, hi, LK, CAUSAL_OFFSET, qk_scale,
                  stride_kn, stride_kd, stride_vn, stride_vd,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """The forward's online-softmax update over key blocks ``[lo, hi)``, transposed: keys along the tile's
    first axis, packed rows (query positions ``pos``, int64) along the second, ``acc`` is O^T (BLOCK_DV,
    BLOCK_M). The same expressions as the forward (the result differs from the forward kernel's only by
    the order of the sums: other blocks, the split merge); the matmuls ``S^T = K Q^T`` and
    ``O^T += V^T P^T`` put the 64 keys (and Dv) in the MMA's M, which must be 64 for Hopper's wgmma,
    and the few packed rows in its N, which may be 16."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = offs_n + start_n
        kmask = keys < LK if MASKED else offs_n < BLOCK_N
        k = tl.load(K_bh + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kmask[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        qk = tl.dot(k, q, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)  # (BLOCK_N, BLOCK_M)
        if MASKED:
            # Per-row bound, relative to the block and clamped into it before narrowing to int32.
            lim = tl.zeros_like(pos) + (LK - 1 - start_n)
            if IS_CAUSAL:
                lim = tl.minimum(lim, pos + (CAUSAL_OFFSET - start_n))
            lim = tl.minimum(tl.maximum(lim, -1), BLOCK_N).to(tl.int32)
            qk = tl.where(offs_n[:, None] <= lim[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 0) * qk_scale)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 0) * qk_scale)
            m_sub = m_new
        p = tl.math.exp2(tl.fma(qk, qk_scale, -m_sub[None, :]))
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(V_bh + keys[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                    mask=kmask[None, :] & (offs_dv[:, None] < HEAD_DV), other=0.0)  # V^T (BLOCK_DV, BLOCK_N)
        acc = acc * alpha[None, :]
        acc = tl.dot(v, p.to(v.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["LQ", "LK", "CAUSAL_OFFSET", "ROWS", "KEYS_PER_SPLIT", "NUM_SPLITS",
                               "NUM_ROW_BLOCKS"])
def attn_decode_kernel(
    Q, K, V, PART_ACC, PART_M, PART_L,
    SM_SCALE: "fp64",
    HKV, GROUP, LQ, LK, CAUSAL_OFFSET, ROWS, KEYS_PER_SPLIT, NUM_SPLITS, NUM_ROW_BLOCKS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Partial attention of ``BLOCK_M`` packed rows of one kv head over one key chunk.

    Grid: (B * HKV * NUM_SPLITS * NUM_ROW_BLOCKS,), row blocks fastest (programs that share a K/V
    chunk run side by side). ``ROWS = GROUP * LQ`` packed rows per kv head. Partials: row
    ``(kv * NUM_SPLITS + split) * ROWS + r`` of ``PART_ACC`` (row stride ``HEAD_DV``), ``PART_M``, ``PART_L``.
    """
    tl.static_assert(BLOCK_D >= HEAD_D, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_DV >= HEAD_DV, "BLOCK_DV must cover the value head dim")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs 16 at least")
    ACC_DTYPE: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32

    pid = tl.program_id(0)
    rb = pid % NUM_ROW_BLOCKS
    split = (pid // NUM_ROW_BLOCKS) % NUM_SPLITS
    kv = (pid // NUM_ROW_BLOCKS // NUM_SPLITS).to(tl.int64)  # b * HKV + kv head
    b = kv // HKV
    kvh = kv % HKV

    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = r < ROWS
    head = kvh * GROUP + (r // LQ)  # int64
    pos = (r % LQ).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = Q + b * stride_qb + head * stride_qh + pos * stride_qm
    q = tl.load(q_rows[None, :] + offs_d[:, None] * stride_qd,
                mask=valid[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)  # Q^T (BLOCK_D, BLOCK_M)
    qk_scale, _ = scales(SM_SCALE, ACC_DTYPE)
    K_bh = K + b * stride_kb + kvh * stride_kh
    V_bh = V + b * stride_vb + kvh * stride_vh

    # The chunk [lo, end) of this split; [lo, full) is seen by every packed row (all positions >= 0),
    # [full, hi) is masked (the causal edge, the end of the keys).
    lo = split.to(tl.int64) * KEYS_PER_SPLIT
    end = tl.minimum(lo + KEYS_PER_SPLIT, LK)
    full = tl.minimum(end, LK // BLOCK_N * BLOCK_N)
    hi = end
    if IS_CAUSAL:
        # CAUSAL_OFFSET in [-LQ, LK] (the launcher clamps it; the same mask), so these do not overflow int32.
        full = tl.minimum(full, tl.maximum(CAUSAL_OFFSET + 1, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, LQ + CAUSAL_OFFSET)  # one past the last key the last position sees
    full = tl.maximum(full, lo)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_DV, BLOCK_M], ACC_DTYPE)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K_bh, V_bh, pos, lo, full, LK, CAUSAL_OFFSET, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd, False, IS_CAUSAL, INPUT_PRECISION,
                                  HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K_bh, V_bh, pos, full, hi, LK, CAUSAL_OFFSET, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd, True, IS_CAUSAL, INPUT_PRECISION,
                                  HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV)

    prow = (kv * NUM_SPLITS + split) * ROWS + r
    tl.store(PART_M + prow, m_i, mask=valid)
    tl.store(PART_L + prow, l_i, mask=valid)
    tl.store(PART_ACC + prow[None, :] * HEAD_DV + offs_dv[:, None], acc,
             mask=valid[None, :] & (offs_dv[:, None] < HEAD_DV))


@triton.jit(do_not_specialize=["LQ", "ROWS", "NUM_SPLITS", "NUM_ROW_BLOCKS"])
def attn_decode_combine_kernel(
    PART_ACC, PART_M, PART_L, O, LSE, LSE_LO,
    HKV, GROUP, LQ, ROWS, NUM_SPLITS, NUM_ROW_BLOCKS,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,  # LSE and LSE_LO
    HEAD_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the ``NUM_SPLITS`` partials of ``BLOCK_R`` packed rows (in split order) and write O, LSE and
    LSE_LO as the forward does. Grid: (B * HKV * NUM_ROW_BLOCKS,)."""
    ACC_DTYPE: tl.constexpr = PART_ACC.dtype.element_ty
    pid = tl.program_id(0)
    rb = pid % NUM_ROW_BLOCKS
    kv = (pid // NUM_ROW_BLOCKS).to(tl.int64)
    b = kv // HKV
    kvh = kv % HKV
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = r < ROWS
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = valid[:, None] & (offs_dv[None, :] < HEAD_DV)

    m_i = tl.full([BLOCK_R], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_R], ACC_DTYPE)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], ACC_DTYPE)
    for split in range(0, NUM_SPLITS):
        prow = (kv * NUM_SPLITS + split) * ROWS + r
        m_s = tl.load(PART_M + prow, mask=valid, other=float("-inf"))
        l_s = tl.load(PART_L + prow, mask=valid, other=0.0)
        a_s = tl.load(PART_ACC + prow[:, None] * HEAD_DV + offs_dv[None, :], mask=cols, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2(-inf - 0) = 0
        alpha = tl.math.exp2(m_i - m_sub)
        beta = tl.math.exp2(m_s - m_sub)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new

    out, l_safe, empty = normalized_rows(acc, l_i)
    head = kvh * GROUP + (r // LQ)
    pos = (r % LQ).to(tl.int64)
    o_rows = O + b * stride_ob + head * stride_oh + pos * stride_om
    tl.store(o_rows[:, None] + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty), mask=cols)
    lse, lse_lo = row_lse(l_safe, empty, m_i, LSE.dtype.element_ty, ACC_DTYPE)
    l_off = b * stride_lb + head * stride_lh + pos * stride_lm
    tl.store(LSE + l_off, lse.to(LSE.dtype.element_ty), mask=valid)
    tl.store(LSE_LO + l_off, lse_lo.to(LSE_LO.dtype.element_ty), mask=valid)
