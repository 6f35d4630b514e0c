"""Attention backward, part 2: the dQ kernel (algorithm: ``attention.py``)."""

import triton
import triton.language as tl

from ._common import load_tile, store_tile
from .attention_common import (
    scales, causal_key_range, visible_tile, visible_rows, plane_descriptor, sequence_bounds, feature_scalars, mod_scores,
    window_visible_tile, window_key_range, load_row_stats,
)
from .dropout import dropout_keep_block


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, k_desc, v_desc, start_m, lo, hi, LK, CAUSAL_OFFSET, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TMA: tl.constexpr,
):
    """Accumulate one query tile's dQ over key blocks ``[lo, hi)`` (``TMA``: K and V through the descriptors,
    as in the forward's ``_attn_fwd_inner``). The TMA loop leaves out the rows' LSE residuals: its sum is short
    of a factor ``exp2(-lo)`` per row, which the caller applies once (the pointer tiles subtract ``lo`` per
    element: scaling the rows at the end made several of them spill, sm_80 and fp32/fp64 tiles)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        rows = LK - start_n if MASKED else BLOCK_N
        if TMA:
            k = k_desc.load([start_n.to(tl.int32), 0])
            v = v_desc.load([start_n.to(tl.int32), 0])
        else:
            k = load_tile(K_bh + start_n * stride_kn, offs_n, offs_d, stride_kn, stride_kd, rows, HEAD_D)
            v = load_tile(V_bh + start_n * stride_vn, offs_n, offs_dv, stride_vn, stride_vd, rows, HEAD_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=dq.dtype)
        if TMA:
            # P / exp2(-lo): the row's LSE residual is a factor of the whole row, so the caller applies it to
            # dQ once (row_scale) instead of one subtraction per score element here.
            p = tl.math.exp2(tl.fma(qk, qk_scale, -row_hi[:, None]))
        else:
            p = tl.math.exp2(tl.fma(qk, qk_scale, -row_hi[:, None]) - row_lo[:, None])
        if MASKED:
            # Keys past LK are masked too: their zero K gives s = 0 and exp2(-lse) can overflow.
            if TMA:
                visible = visible_rows(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            else:
                visible = visible_tile(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
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
        s2, t = mod_scores(qk, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
        p = tl.math.exp2((s2 - row_hi[:, None]) - row_lo[:, None])
        if MASKED:
            visible = visible_tile(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            if HAS_LEFT:
                visible = window_visible_tile(visible, offs_m[:, None], offs_n[None, :], start_m, start_n, LEFT_OFFSET,
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
    LQ_BUCKET, LK_BUCKET, TMA_OK,  # autotune keys only (TMA_OK: Q, K, V and dO allow TMA tiles)
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
    # Q, dO, K, V through TMA descriptors (a tile's choice; plain launches on sm_90+, 16-bit, aligned)
    TMA: tl.constexpr = False,
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
    tl.static_assert(not (TMA and FEATURES), "TMA tiles are for plain launches")
    offs_m_local = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if FEATURES:
        if IS_VARLEN:
            q0, LQ = sequence_bounds(CU_SEQLENS_Q, b)
            k0, LK = sequence_bounds(CU_SEQLENS_K, b)
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
        row_hi, row_lo, delta = load_row_stats(LSE + row, LSE_LO + row, DELTA_blk, offs_m_local, rows, stride_lm,
                                                stride_dem, ACC_DTYPE)
        qk_scale, sm_scale = scales(SM_SCALE, ACC_DTYPE)
        cap_scale, cap2, slope2, keep_scale = feature_scalars(
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
            lo, a, full, hi = window_key_range(start_m, LK, CAUSAL_OFFSET, LEFT_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        else:
            full, hi = causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
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
        K_bh = K + b * stride_kb + kvh * stride_kh
        V_bh = V + b * stride_vb + kvh * stride_vh
        if TMA:
            # Q and dO stay in shared memory as the wgmma's A operands; K and V stream through TMA.
            q_desc = plane_descriptor(Q + b * stride_qb + h * stride_qh, LQ, stride_qm, HEAD_D, BLOCK_M, BLOCK_D)
            do_desc = plane_descriptor(DO + b * stride_dob + h * stride_doh, LQ, stride_dom, HEAD_DV, BLOCK_M,
                                       BLOCK_DV)
            k_desc = plane_descriptor(K_bh, LK, stride_kn, HEAD_D, BLOCK_N, BLOCK_D)
            v_desc = plane_descriptor(V_bh, LK, stride_vn, HEAD_DV, BLOCK_N, BLOCK_DV)
            q = q_desc.load([start_m.to(tl.int32), 0])
            do = do_desc.load([start_m.to(tl.int32), 0])
        else:
            k_desc = None
            v_desc = None
            q = load_tile(Q + b * stride_qb + h * stride_qh + start_m * stride_qm, offs_m_local, offs_d,
                          stride_qm, stride_qd, rows, HEAD_D)
            do = load_tile(DO + b * stride_dob + h * stride_doh + start_m * stride_dom, offs_m_local, offs_dv,
                           stride_dom, stride_dod, rows, HEAD_DV)
        row = b * stride_lb + h * stride_lh + start_m * stride_lm
        row_hi, row_lo, delta = load_row_stats(LSE + row, LSE_LO + row,
                                                DELTA + b * stride_deb + h * stride_deh + start_m * stride_dem,
                                                offs_m_local, rows, stride_lm, stride_dem, ACC_DTYPE)
        qk_scale, sm_scale = scales(SM_SCALE, ACC_DTYPE)

        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        full, hi = causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, k_desc, v_desc, start_m, 0, full, LK, CAUSAL_OFFSET,
            qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            False, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, TMA,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_hi, row_lo, delta, K_bh, V_bh, k_desc, v_desc, start_m, full, hi, LK, CAUSAL_OFFSET,
            qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
            True, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, TMA,
        )
        if TMA:
            # dQ_i = sm_scale * exp2(-lo_i) * sum_j P'_ij (dP_ij - Delta_i) K_j, P' the loop's exp2(s - hi).
            dq = dq * (tl.math.exp2(-row_lo) * sm_scale)[:, None]
        else:
            dq = dq * sm_scale
        store_tile(DQ + b * stride_dqb + h * stride_dqh + start_m * stride_dqm,
                   dq.to(DQ.dtype.element_ty), offs_m_local, offs_d, stride_dqm, stride_dqd,
                   rows, HEAD_D)
