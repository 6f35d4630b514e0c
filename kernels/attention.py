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
    - ``attn_bwd_preprocess_kernel``: ``Delta = rowsum(dO * O)`` (= rowsum(P * dP)); for launches that may
      run TMA tiles on sm_90+ also, in buffers padded to the block, what the dK/dV kernel's TMA loop reads
      without masks: ``dO' = exp2(-lo) * dO`` (the LSE residual ``lo`` folded into dO, one more dO-sized
      buffer) and two row statistics, minus the base-2 LSE and ``Delta' = rowsum(dO' * O)``.
    - ``attn_bwd_dkdv_kernel``: one program per (key block, batch * kv head). dK and dV of the block
      stay in registers while the program loops over the (query head of its GQA group, query block)
      pairs that can see the keys (one flat loop; the causal mask is applied in every iteration),
      recomputing ``P^T = exp2(K Q^T * scale*log2e - LSE*log2e)``: ``dV += P^T dO``,
      ``dS^T = P^T * (V dO^T - Delta)``, ``dK += dS^T Q``. The TMA loop computes ``P' = exp2(lo) * P``
      (no residual per element) against dO' and Delta', which carry ``exp2(-lo)`` instead.
    - ``attn_bwd_dq_kernel``: one program per (query block, batch * query head), looping over key
      blocks like the forward: ``dQ += (P * (dO V^T - Delta)) K``. The LSE residual ``lo`` of a query row
      is a factor ``exp2(-lo)`` of every P in that row, hence of its whole dQ row: the TMA loop computes P
      without it and the epilogue scales each dQ row once (the pointer and feature paths subtract it per
      element as the dK/dV kernel does).
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
- ``HAS_SOFTCAP`` / ``HAS_ALIBI``: the scores go through ``mod_scores`` (``softcap * tanh(s / softcap)``,
  then ``- slope * |j - i - diag|``) in the base-2 domain, before the row maximum; the backward calls the
  same function on the same operands, so its P is the forward's, and multiplies dS by ``1 - tanh^2``.
  The LSE residual scheme is kept: ``P = exp2((s2 - hi) - lo)``.
- ``HAS_DROPOUT``: the keep-mask of ``kernels/dropout.py`` (a function of seed, offset, batch or sequence,
  head and positions only) applied to P after the row sum in the forward, regenerated in the backward:
  ``dV = (P Z)^T dO``, ``dP = (dO V^T) Z``; Delta = rowsum(dO * O) stays right (O already has Z).

TMA tiles (``TMA``, a constexpr each kernel takes from its tile; sm_90+, fp16/bf16, plain launches whose
tensors have contiguous head dims and 16-byte aligned rows and bases, ``attention_configs.tma_compatible``):
the operands a program streams or holds come through device-side tensor descriptors
(``tl.make_tensor_descriptor``; Hopper's TMA unit) instead of per-element pointers. Rows past the end and
columns past the head dim read as zeros; held operands stay in shared memory as wgmma operands; no
address tensor occupies registers, and the masked blocks compare each score against a per-row bound
(``visible_rows``) instead of a hoisted index tile. What that frees is what lets the forward and dQ run
128 x 128 tiles (wgmma N = 128) at D = 128 without spills. A launch without ``TMA`` compiles to the code
above, unchanged.

Limits: no arbitrary attention mask, no fp8. The fp64 backward at
D > 128 needs more than the ~100 KB of shared memory of sm_86/sm_89 parts (no config fits there).
The dK/dV kernel's parallelism is B * Hkv * cdiv(Lk, BLOCK_N) programs, so MQA on very few heads and short keys may not
fill a large GPU.

Modules: ``attention.py`` (the forward, and the backward kernels re-exported so launchers import one
module), ``attention_dkdv.py`` (Delta preprocess, dK/dV), ``attention_dq.py`` (dQ), ``attention_common.py``
(shared helpers).
"""

import triton
import triton.language as tl

from ._common import load_tile, store_tile
from .attention_common import (
    scales, causal_key_range, visible_tile, visible_rows, plane_descriptor, sequence_bounds, feature_scalars, mod_scores,
    window_visible_tile, window_key_range, normalized_rows, row_lse,
)
from .dropout import dropout_keep_block


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K_bh, V_bh, k_desc, v_desc, start_m, lo, hi, LK, CAUSAL_OFFSET, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    TMA: tl.constexpr,
):
    """Online-softmax update of one query tile over key blocks ``[lo, hi)``.

    ``m_i`` is the running row maximum in the scaled base-2 domain, ``fl(max(q.k) * qk_scale)``. Each
    probability is ``exp2(fma(q.k, qk_scale, -m_i))``: the product is not rounded before the maximum is
    subtracted, so the result is accurate to the rounding of a small number however large the logits
    are, and the rounding of ``m_i`` itself is common to the whole row (it cancels in ``acc / l``).
    The backward recomputes the same expression (see ``load_row_stats``).

    ``TMA``: K and V come through the tensor descriptors ``k_desc`` / ``v_desc`` (Hopper's TMA unit: one
    instruction per tile, rows past LK and columns past the head dim read as zeros, no per-element
    addresses held in registers); otherwise through masked pointer loads.
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
        if TMA:
            k = k_desc.load([start_n.to(tl.int32), 0])
        else:
            k = load_tile(k_blk, offs_n, offs_d, stride_kn, stride_kd, rows, HEAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        if MASKED:
            if TMA:
                visible = visible_rows(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            else:
                visible = visible_tile(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
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
        if TMA:
            v = v_desc.load([start_n.to(tl.int32), 0])
        else:
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
    """:func:`_attn_fwd_inner` with the features: scores through :func:`mod_scores` (``m_i`` is then the
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
        s2, _ = mod_scores(qk, rel, qk_scale, cap_scale, cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            visible = visible_tile(start_m, start_n, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
            if HAS_LEFT:
                visible = window_visible_tile(visible, offs_m[:, None], offs_n[None, :], start_m, start_n, LEFT_OFFSET,
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
    LQ_BUCKET, LK_BUCKET, TMA_OK,  # autotune keys only (TMA_OK: K and V allow TMA tiles)
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
    # K/V through TMA descriptors (a tile's choice; plain launches on sm_90+, 16-bit, aligned K/V)
    TMA: tl.constexpr = False,
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
    tl.static_assert(not (TMA and FEATURES), "TMA tiles are for plain launches")
    if IS_VARLEN:
        q0, LQ = sequence_bounds(CU_SEQLENS_Q, b)
        k0, LK = sequence_bounds(CU_SEQLENS_K, b)
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
    if TMA:
        # Q through a descriptor too: it then stays in shared memory as the wgmma's A operand instead of
        # holding 64 registers per thread for the whole program (rows past LQ read as zeros).
        q_desc = plane_descriptor(Q_blk - start_m * stride_qm, LQ, stride_qm, HEAD_D, BLOCK_M, BLOCK_D)
        q = q_desc.load([start_m.to(tl.int32), 0])
    else:
        q = load_tile(Q_blk, offs_m_local, offs_d, stride_qm, stride_qd, LQ - start_m, HEAD_D)
    qk_scale, _ = scales(SM_SCALE, ACC_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)

    if FEATURES:
        cap_scale, cap2, slope2, keep_scale = feature_scalars(
            SM_SCALE, SOFTCAP, ALIBI, b * stride_ab + h * stride_ah, DROPOUT_P, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ACC_DTYPE)
        seed = 0
        rng_offset = 0
        if HAS_DROPOUT:
            seed = tl.load(RNG)
            rng_offset = tl.load(RNG + 1)
        bh = pid_bh  # = b * H + h: the dropout mask's (batch or sequence, head) word
        if HAS_LEFT:
            lo, a, full, hi = window_key_range(start_m, LK, CAUSAL_OFFSET, LEFT_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        else:
            full, hi = causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
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
        if TMA:
            # One 2-D descriptor per (batch, kv head); the launcher checked stride_kd = stride_vd = 1 and
            # 16-byte aligned rows (attention_configs.tma_compatible).
            k_desc = plane_descriptor(K_bh, LK, stride_kn, HEAD_D, BLOCK_N, BLOCK_D)
            v_desc = plane_descriptor(V_bh, LK, stride_vn, HEAD_DV, BLOCK_N, BLOCK_DV)
        else:
            k_desc = None
            v_desc = None
        full, hi = causal_key_range(start_m, LK, CAUSAL_OFFSET, IS_CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, k_desc, v_desc, start_m, 0, full, LK, CAUSAL_OFFSET, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            False, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, TMA,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_bh, V_bh, k_desc, v_desc, start_m, full, hi, LK, CAUSAL_OFFSET, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            True, IS_CAUSAL, INPUT_PRECISION, HEAD_D, HEAD_DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, TMA,
        )

    out, l_safe, empty = normalized_rows(acc, l_i)
    if IS_VARLEN:
        O_blk = O + q0 * stride_om + h * stride_oh + start_m * stride_om
    else:
        O_blk = O + b * stride_ob + h * stride_oh + start_m * stride_om
    store_tile(O_blk, out.to(O.dtype.element_ty), offs_m_local, offs_dv, stride_om, stride_od,
               LQ - start_m, HEAD_DV)
    lse, lse_lo = row_lse(l_safe, empty, m_i, LSE.dtype.element_ty, ACC_DTYPE)
    row_mask = offs_m_local < LQ - start_m
    if IS_VARLEN:
        row_off = q0 * stride_lm + h * stride_lh + (start_m + offs_m_local) * stride_lm
    else:
        row_off = b * stride_lb + h * stride_lh + (start_m + offs_m_local) * stride_lm
    tl.store(LSE + row_off, lse.to(LSE.dtype.element_ty), mask=row_mask)
    tl.store(LSE_LO + row_off, lse_lo.to(LSE_LO.dtype.element_ty), mask=row_mask)


# The backward and decoding kernels live in their own modules; launchers find them all here.
from .attention_dkdv import attn_bwd_dkdv_kernel, attn_bwd_preprocess_kernel  # noqa: E402,F401
from .attention_dq import attn_bwd_dq_kernel  # noqa: E402,F401
from .attention_decode import attn_decode_kernel, attn_decode_combine_kernel  # noqa: E402,F401
