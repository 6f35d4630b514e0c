"""Attention backward, part 1: the Delta preprocess and the dK/dV kernel (algorithm: ``attention.py``)."""

import triton
import triton.language as tl

from ._common import load_tile, store_tile
from .attention_common import (
    scales, sequence_bounds, feature_scalars, mod_scores, window_visible_tile, load_row_stats, load_lse2,
    plane_descriptor, LOG2E,
)
from .attention_configs import do_row_width
from .dropout import dropout_keep


@triton.jit
def attn_bwd_preprocess_kernel(
    # pointers
    O, DO, DELTA, LSE, LSE_LO, STATS, DO_S,
    # sizes
    H, LQ, LQ_PAD,
    # strides
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_deb, stride_deh, stride_dem,
    stride_lb, stride_lh, stride_lm,
    # constexpr
    HEAD_DV: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    # also the padded row statistics of the dK/dV kernel's TMA loop
    ROW_STATS: tl.constexpr = False,
):
    """``Delta = rowsum(dO * O)`` in the accumulator dtype; equals rowsum(P * dP) of the backward.

    Grid: (cdiv(LQ, BLOCK_M) * B * H,); with ``ROW_STATS``, (cdiv(LQ_PAD, BLOCK_M) * B * H,).

    ``ROW_STATS``: also write what the dK/dV kernel's TMA loop reads, in place of dO, LSE, its residual
    and Delta, so that loop has no residual to subtract and no masks or remaps:

    - ``DO_S[b * H + h, :LQ_PAD, :HEAD_DV]`` (rows of ``do_row_width(HEAD_DV)`` elements):
      ``dO' = exp2(-lo) * dO`` rounded to dO's dtype, ``lo`` the row's LSE residual. With
      ``P = exp2(s - hi - lo) = exp2(-lo) * P'``: ``dV = sum_i P'_i dO'_i`` and
      ``dS = P' * (dO' V^T - Delta')``, so the loop computes ``P' = exp2(fma(qk, scale, -hi))``.
      ``lo`` is below 2^-12 unless |LSE| exceeds ~1000, and then dO' costs one rounding of dO
      (P is rounded to the same dtype before its matmul anyway); otherwise dO' is dO bit for bit.
    - ``STATS[b * H + h, 0:2, :LQ_PAD]`` (contiguous; ``LQ_PAD`` a multiple of every dK/dV ``BLOCK_M`` and
      of this ``BLOCK_M``) = minus the base-2 LSE, ``-hi = -LSE * log2(e)`` (the FFMA's addend as it is;
      Triton 3.6 negated each value in the loop), and ``Delta' = rowsum(dO' * O)`` (dO''s own Delta, so
      dP' and Delta' cancel as dP and Delta do). A -inf LSE (a row that saw no key) and the padding rows
      past LQ read ``hi = +inf`` (P' = 0) and Delta' = 0, dO' = 0.
    """
    ACC_DTYPE: tl.constexpr = tl.float64 if O.dtype.element_ty == tl.float64 else tl.float32
    num_m = tl.cdiv(LQ_PAD if ROW_STATS else LQ, BLOCK_M)
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
    if ROW_STATS:
        DV_PAD: tl.constexpr = do_row_width(HEAD_DV)
        row_hi, row_lo = load_lse2(LSE + b * stride_lb + h * stride_lh + start_m * stride_lm,
                                   LSE_LO + b * stride_lb + h * stride_lh + start_m * stride_lm,
                                   offs_m, LQ - start_m, stride_lm, ACC_DTYPE)
        do_s = (do.to(ACC_DTYPE) * tl.math.exp2(-row_lo)[:, None]).to(DO_S.dtype.element_ty)
        store_tile(DO_S + (pid_bh * LQ_PAD + start_m) * DV_PAD, do_s, offs_m, offs_dv, DV_PAD, 1, BLOCK_M,
                   HEAD_DV)
        stats = STATS + pid_bh * 2 * LQ_PAD + start_m + offs_m
        tl.store(stats, -row_hi)
        tl.store(stats + LQ_PAD, tl.sum(o.to(ACC_DTYPE) * do_s.to(ACC_DTYPE), axis=1))


@triton.jit
def _dkdv_load_block(Q_b, DO_b, LSE_b, LSE_LO_b, DELTA_b, g, start_m, LQ, offs_m, offs_d, offs_dv,
                     stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_lh, stride_lm,
                     stride_deh, stride_dem, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """What the pointer loops (plain and with features) read for query head ``g`` of the group and the query
    block from row ``start_m``: its Q and dO tiles (rows past LQ as zeros) and row statistics
    (:func:`load_row_stats`)."""
    rows = LQ - start_m
    q = load_tile(Q_b + g * stride_qh + start_m * stride_qm, offs_m, offs_d, stride_qm, stride_qd, rows, HEAD_D)
    do = load_tile(DO_b + g * stride_doh + start_m * stride_dom, offs_m, offs_dv, stride_dom, stride_dod, rows,
                   HEAD_DV)
    row = g * stride_lh + start_m * stride_lm
    row_hi, row_lo, delta = load_row_stats(LSE_b + row, LSE_LO_b + row, DELTA_b + g * stride_deh + start_m * stride_dem,
                                            offs_m, rows, stride_lm, stride_dem, ACC_DTYPE)
    return q, do, row_hi, row_lo, delta


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
    P^T is recomputed from :func:`mod_scores`, as the forward computed it; dropout: ``dV = (P Z)^T dO``,
    ``dP = (dO V^T) Z`` with the forward's keep-mask ``Z`` (scaled by ``1 / (1 - p)``); softcap: ``dS``
    times ``1 - t^2``.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    h0 = kvh * GROUP
    if IS_VARLEN:
        q0, LQ = sequence_bounds(CU_SEQLENS_Q, b)
        k0, LK = sequence_bounds(CU_SEQLENS_K, b)
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
    qk_scale, sm_scale = scales(SM_SCALE, ACC_DTYPE)
    cap_scale, cap2, slope2, keep_scale = feature_scalars(
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
    if n_blocks > 0:
        # As in the TMA loop: said to run at least once, so ptxas does not serialise the wgmma (C7515 on
        # sm_90 for 16x64/8 warps at D = 128 without it).
        tl.assume(n_blocks > 0)
        tl.assume(GROUP > 0)
        for it in range(0, GROUP * n_blocks):
            g = it // n_blocks
            start_m = lo + (it - g * n_blocks) * BLOCK_M
            q, do, row_hi, row_lo, delta = _dkdv_load_block(
                Q_b, DO_b, LSE_b, LSE_LO_b, DELTA_b, g, start_m, LQ, offs_m, offs_d, offs_dv, stride_qh, stride_qm,
                stride_qd, stride_doh, stride_dom, stride_dod, stride_lh, stride_lm, stride_deh, stride_dem,
                HEAD_D, HEAD_DV, ACC_DTYPE)
            qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            rel = None
            if HAS_ALIBI:
                slope2 = tl.load(ALIBI + b * stride_ab + (h0 + g) * stride_ah).to(ACC_DTYPE) * LOG2E
                rel = offs_n[:, None] - offs_m[None, :] + (start_n - start_m - DIAG).to(tl.int32)
            s2, t = mod_scores(qk_t, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
            p_t = tl.math.exp2((s2 - row_hi[None, :]) - row_lo[None, :])
            if IS_CAUSAL or HAS_LEFT:
                visible = offs_n[:, None] >= 0
                if IS_CAUSAL:
                    shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
                    visible = visible & (offs_n[:, None] - offs_m[None, :] <= shift)
                if HAS_LEFT:
                    visible = window_visible_tile(visible, offs_m[None, :], offs_n[:, None], start_m, start_n,
                                                  LEFT_OFFSET, BLOCK_M, BLOCK_N)
                p_t = tl.where(visible, p_t, 0.0)
            if HAS_DROPOUT:
                keep_t = dropout_keep(seed, rng_offset, bh0 + g, (start_m + offs_m)[None, :],
                                      (start_n + offs_n)[:, None], THRESHOLD)
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


@triton.jit
def _dkdv_accumulate_t(dk, dv, p_t, q, do, v, delta, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``dV += P^T dO`` and ``dK += dS^T Q`` (``dS^T = P^T * (V dO^T - Delta)``, unscaled) from transposed
    probabilities ``p_t`` (keys x queries): the step the pointer and transposed TMA loops share."""
    if COMPUTE_DV:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if COMPUTE_DK:
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dk, dv


@triton.jit
def _q_do_descriptors(Q_h0, DO_S_h0, GROUP, LQ, LQ_PAD, stride_qh, stride_qm, HEAD_D: tl.constexpr,
                      HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """3-D descriptors (head of the group, row, dim) of Q and of the preprocess's dO' (``(B * H, LQ_PAD,
    do_row_width(HEAD_DV))``, contiguous) from the group's first query head, read in ``BLOCK_M``-row boxes:
    rows past LQ read as zeros."""
    DV_PAD: tl.constexpr = do_row_width(HEAD_DV)
    q_desc = tl.make_tensor_descriptor(Q_h0, shape=[GROUP, LQ, HEAD_D], strides=[stride_qh, stride_qm, 1],
                                       block_shape=[1, BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(DO_S_h0, shape=[GROUP, LQ, HEAD_DV], strides=[LQ_PAD * DV_PAD, DV_PAD, 1],
                                        block_shape=[1, BLOCK_M, BLOCK_DV])
    return q_desc, do_desc


@triton.jit
def _attn_bwd_dkdv_tma(
    dk, dv, k, v, q_desc, do_desc, STATS_b, LQ_PAD, start_n, lo, n_blocks, GROUP, CAUSAL_OFFSET, qk_scale,
    MASKED: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ROWS: tl.constexpr,
):
    """The TMA tiles' dK/dV loop over ``GROUP * n_blocks`` (query head of the group, query block) pairs from
    query row ``lo`` (``BLOCK_M`` rows each). ``MASKED``: the blocks on the causal diagonal; unmasked: blocks
    whose every row sees every key of the block. ``do_desc`` reads the preprocess's dO' (the LSE residual
    folded in), the row statistics come from its padded buffer (``STATS_b``: the group's first head, two rows
    of ``LQ_PAD`` per head: minus the base-2 LSE, and Delta'): two unmasked vector loads per iteration, no
    residual to subtract; rows past LQ read LSE = +inf (P = 0). Keys past LK need no mask here: each key row
    of dK/dV only sums its own P^T row, and those rows are never stored.

    ``ROWS`` (tiles whose query block is at least the key block: ``BLOCK_M >= BLOCK_N``): scores as
    (queries x keys), ``S = Q K^T``, so the row statistics are per row (two values a thread instead of
    one per key column it holds: at 128 x 128 that frees ~60 registers), and P^T, dS^T reach the dK/dV
    wgmma through shared memory (stmatrix) as A operands. Otherwise transposed scores (keys x queries), P^T
    and dS^T straight from registers: the layout of the tiles whose query block is thinner than a
    warpgroup's 64 rows per 4 warps (in the rows layout their warps would compute the same rows twice).
    In the rows layout the masked (diagonal) loop is not software-pipelined: it runs a block or two per
    query head, and its pipeline's buffers cost the registers that made 128 x 128 spill (88-96 bytes at
    D = 64; in the transposed layout the same change cost Triton 3.6 0.3 instructions per element)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # (head of the group, query block) carried from iteration to iteration: no division per iteration.
    g = n_blocks * 0
    start_m = lo.to(tl.int32)
    end_m = start_m + n_blocks * BLOCK_M
    if n_blocks > 0:
        # Said so, the loop runs at least once: without it, the path that skips a zero-trip loop hands
        # dK/dV's zeros (movs) to the loop's final wgmma wait, and ptxas serialises every wgmma of the loop
        # (C7515; 40-48 WARPGROUP per iteration instead of 6, seen on the non-causal launches).
        tl.assume(n_blocks > 0)
        tl.assume(GROUP > 0)
        n_iter = GROUP * n_blocks
        tl.assume(n_iter > 0)
        for _ in tl.range(0, n_iter, num_stages=1 if MASKED and ROWS else None):
            q = q_desc.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_desc.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
            # Offsets are multiples of BLOCK_M (LQ_PAD of ROW_STATS_ALIGN): said so, Triton 3.6 vectorises the loads.
            stats = STATS_b + tl.multiple_of(g * 2 * LQ_PAD + start_m, BLOCK_M) + offs_m
            neg_hi = tl.load(stats)
            delta = tl.load(stats + LQ_PAD)
            if MASKED:
                # Key start_n + c is visible to query start_m + r iff c <= r + shift.
                shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
            if ROWS:
                qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                p = tl.math.exp2(tl.fma(qk, qk_scale, neg_hi[:, None]))
                if MASKED:
                    # One compare per element against a per-row bound (no hoisted index tile).
                    p = tl.where(offs_n[None, :] <= (offs_m + shift)[:, None], p, 0.0)
                if COMPUTE_DV:
                    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                if COMPUTE_DK:
                    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                    ds = p * (dp - delta[:, None])
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:
                qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                p_t = tl.math.exp2(tl.fma(qk_t, qk_scale, neg_hi[None, :]))
                if MASKED:
                    # One compare per element against a per-key bound (no hoisted index tile).
                    p_t = tl.where(offs_m[None, :] >= (offs_n - shift)[:, None], p_t, 0.0)
                dk, dv = _dkdv_accumulate_t(dk, dv, p_t, q, do, v, delta, COMPUTE_DK, COMPUTE_DV, INPUT_PRECISION,
                                            ACC_DTYPE)
            start_m += BLOCK_M
            wrap = start_m >= end_m
            g += wrap.to(tl.int32)
            start_m = tl.where(wrap, lo.to(tl.int32), start_m)
    return dk, dv


@triton.jit(do_not_specialize=["LQ", "LK", "CAUSAL_OFFSET", "LEFT_OFFSET", "DIAG", "THRESHOLD"])
def attn_bwd_dkdv_kernel(
    # pointers
    Q, K, V, DO, LSE, LSE_LO, DELTA, DK, DV,
    STATS, DO_S,  # the preprocess's padded row statistics and dO' (TMA_OK launches on sm_90+; else None)
    # scalars
    SM_SCALE: "fp64",
    # sizes
    HKV, GROUP, LQ, LK, CAUSAL_OFFSET,
    LQ_BUCKET, LK_BUCKET, TMA_OK,  # autotune keys only (TMA_OK: Q, K, V and dO allow TMA tiles)
    LQ_PAD,  # rows per head in STATS
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
    # Q, dO, K, V through TMA descriptors (a tile's choice; plain launches on sm_90+, 16-bit, aligned)
    TMA: tl.constexpr = False,
):
    """dK, dV of one key block of one kv head, summed over the GROUP query heads that read it.

    Grid: (cdiv(LK, BLOCK_N) * B * HKV,). Query head ``kvh * GROUP + g`` reads kv head ``kvh``; LSE and
    Delta are indexed by query head (B, HKV * GROUP, LQ).

    One flat loop over (query head of the group, query block) pairs rather than two nested loops: the
    nest cost registers (spills at D = 128 on sm_90) and restarted the load pipeline at every head.
    Scores are transposed (keys x queries) so dK and dV come out of plain ``tl.dot`` s (the TMA tiles with
    ``BLOCK_M >= BLOCK_N`` compute them as queries x keys, see :func:`_attn_bwd_dkdv_tma`). Padding query
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
    tl.static_assert(not (TMA and FEATURES), "TMA tiles are for plain launches")
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
        # The group's first query head; head g of the group is at + g * stride_*h.
        h0 = kvh * GROUP
        if TMA:
            # K and V stay in shared memory as the wgmma's A operands (not 2 x BLOCK_N x D registers);
            # Q and dO stream through 3-D descriptors (group head, row, dim): rows past LQ read as zeros.
            k_desc = plane_descriptor(K + b * stride_kb + kvh * stride_kh, LK, stride_kn, HEAD_D, BLOCK_N, BLOCK_D)
            v_desc = plane_descriptor(V + b * stride_vb + kvh * stride_vh, LK, stride_vn, HEAD_DV, BLOCK_N, BLOCK_DV)
            # dO' = exp2(-lo) * dO from the preprocess; its head b * H + h0 = pid_bh * GROUP.
            Q_h0 = Q + b * stride_qb + h0 * stride_qh
            DO_S_h0 = DO_S + pid_bh * GROUP * LQ_PAD * do_row_width(HEAD_DV)
            q_desc, do_desc = _q_do_descriptors(Q_h0, DO_S_h0, GROUP, LQ, LQ_PAD, stride_qh, stride_qm, HEAD_D, HEAD_DV,
                                                BLOCK_M, BLOCK_D, BLOCK_DV)
            k = k_desc.load([start_n.to(tl.int32), 0])
            v = v_desc.load([start_n.to(tl.int32), 0])
        else:
            k = load_tile(K + b * stride_kb + kvh * stride_kh + start_n * stride_kn, offs_n, offs_d,
                          stride_kn, stride_kd, LK - start_n, HEAD_D)
            v = load_tile(V + b * stride_vb + kvh * stride_vh + start_n * stride_vn, offs_n, offs_dv,
                          stride_vn, stride_vd, LK - start_n, HEAD_DV)
        qk_scale, sm_scale = scales(SM_SCALE, ACC_DTYPE)

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
        if TMA:
            STATS_b = STATS + pid_bh * GROUP * 2 * LQ_PAD  # (b * HKV + kvh) * GROUP = b * H + h0
            ROWS: tl.constexpr = BLOCK_M >= BLOCK_N  # see _attn_bwd_dkdv_tma
            n_bulk = n_blocks
            lo_bulk = lo
            if IS_CAUSAL:
                # The diagonal blocks (masked) first, then the bulk, whose rows see every key of the block,
                # from the first multiple of BLOCK_M past it. In the transposed layout the diagonal blocks
                # are half as high (half the work masked away above the diagonal, and a loop that takes
                # fewer registers beside the bulk one); in the rows layout a block below a warpgroup's rows
                # would be computed twice, so they keep the full height.
                BM_D: tl.constexpr = BLOCK_M // 2 if BLOCK_M >= 32 and not ROWS else BLOCK_M
                if BM_D == BLOCK_M:
                    qd_desc = q_desc
                    dod_desc = do_desc
                else:
                    qd_desc, dod_desc = _q_do_descriptors(Q_h0, DO_S_h0, GROUP, LQ, LQ_PAD, stride_qh, stride_qm,
                                                          HEAD_D, HEAD_DV, BM_D, BLOCK_D, BLOCK_DV)
                lo_d = tl.minimum(tl.maximum(start_n - CAUSAL_OFFSET, 0) // BM_D * BM_D, LQ)
                first_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - CAUSAL_OFFSET, 0), BLOCK_M) * BLOCK_M
                lo_bulk = tl.minimum(tl.maximum(first_full, lo), LQ)
                n_diag = tl.cdiv(lo_bulk - lo_d, BM_D).to(tl.int32)
                n_bulk = tl.cdiv(LQ - lo_bulk, BLOCK_M).to(tl.int32)
                dk, dv = _attn_bwd_dkdv_tma(
                    dk, dv, k, v, qd_desc, dod_desc, STATS_b, LQ_PAD, start_n, lo_d, n_diag, GROUP, CAUSAL_OFFSET,
                    qk_scale, True, COMPUTE_DK, COMPUTE_DV, INPUT_PRECISION, BM_D, BLOCK_N, BLOCK_D, BLOCK_DV,
                    ACC_DTYPE, ROWS,
                )
            dk, dv = _attn_bwd_dkdv_tma(
                dk, dv, k, v, q_desc, do_desc, STATS_b, LQ_PAD, start_n, lo_bulk, n_bulk,
                GROUP, CAUSAL_OFFSET, qk_scale,
                False, COMPUTE_DK, COMPUTE_DV, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, ACC_DTYPE, ROWS,
            )
        else:
            for it in range(0, GROUP * n_blocks):
                g = it // n_blocks
                start_m = lo + (it - g * n_blocks) * BLOCK_M
                q, do, row_hi, row_lo, delta = _dkdv_load_block(
                    Q_b, DO_b, LSE_b, LSE_LO_b, DELTA_b, g, start_m, LQ, offs_m, offs_d, offs_dv, stride_qh, stride_qm,
                    stride_qd, stride_doh, stride_dom, stride_dod, stride_lh, stride_lm, stride_deh, stride_dem,
                    HEAD_D, HEAD_DV, ACC_DTYPE)
                qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                p_t = tl.math.exp2(tl.fma(qk_t, qk_scale, -row_hi[None, :]) - row_lo[None, :])
                if IS_CAUSAL:
                    # Key start_n + c is visible to query start_m + r iff c - r <= shift (int32, see visible_tile).
                    shift = tl.minimum(tl.maximum(start_m + CAUSAL_OFFSET - start_n, -BLOCK_M), BLOCK_N).to(tl.int32)
                    p_t = tl.where(offs_n[:, None] - offs_m[None, :] <= shift, p_t, 0.0)
                dk, dv = _dkdv_accumulate_t(dk, dv, p_t, q, do, v, delta, COMPUTE_DK, COMPUTE_DV, INPUT_PRECISION,
                                            ACC_DTYPE)

        if COMPUTE_DK:
            store_tile(DK + b * stride_dkb + kvh * stride_dkh + start_n * stride_dkn,
                       (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd,
                       LK - start_n, HEAD_D)
        if COMPUTE_DV:
            store_tile(DV + b * stride_dvb + kvh * stride_dvh + start_n * stride_dvn,
                       dv.to(DV.dtype.element_ty), offs_n, offs_dv, stride_dvn, stride_dvd,
                       LK - start_n, HEAD_DV)
