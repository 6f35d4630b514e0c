"""Attention dropout keep-masks from a counter-based RNG: the one definition, as ``@triton.jit`` helpers.

The keep-mask of a call is a pure function of ``(seed, offset, b, h, i, j)``: batch (or sequence, for
varlen) ``b``, query head ``h`` of ``H``, query position ``i`` and key position ``j`` (positions within
the sequence). Nothing else enters, so no tile size, head dim, launch grid or GPU can change it, and the
backward regenerates exactly the forward's mask without storing it.

Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011), through ``tl.philox``, whose 32-bit path is the standard one in Triton 3.2 through 3.9 (the
Random123 round and key schedule; see ``gradkernels.dropout``, which checks it against Random123's
published answers). Only 32-bit words are ever passed: a 64-bit counter would switch ``tl.philox`` to
Philox4x64 (other constants, and a zero high key word) and ``tl.randint4x`` splits a 64-bit offset into
two counter words, so neither is used here.

Layout (all words uint32)::

    key     = (seed mod 2^32, (seed >> 32) mod 2^32)           the 64-bit seed, split as tl.philox does
    counter = (j >> 2, i, b * H + h, offset mod 2^32)
    r       = word (j & 3) of Philox4x32-10(counter, key)      4 keys per Philox evaluation
    keep    = r >= T,  T = min(ceil(p * 2^32), 2^32 - 1)       i.e. r / 2^32 >= p, exactly

so ``P(keep) = 1 - p`` to within 2^-32. Kept probabilities are scaled by ``1 / (1 - p)``.

Limits: positions and ``B * H`` below 2^32. ``gradkernels.dropout`` holds the bitwise-identical torch
implementation and the public ``dropout_mask`` helper; ``gradkernels.ops.dropout`` launches
:func:`dropout_mask_kernel`.

Helpers for the attention kernels:

- :func:`dropout_keep`: the keep-mask at any broadcastable (i, j) positions (one Philox per element,
  the word chosen by ``j & 3``): for tiles of any shape and orientation (P or P^T).
- :func:`dropout_keep_block`: the same values for a (BLOCK_M, BLOCK_N) tile whose columns are
  ``start_n + arange(BLOCK_N)`` with ``start_n`` and ``BLOCK_N`` multiples of 4: one Philox per four
  keys, the words interleaved into place (a quarter of the work).
"""

import triton
import triton.language as tl


@triton.jit
def _threshold_u32(THRESHOLD):
    # T arrives as the int32 with T's bit pattern (gradkernels.dropout.threshold_bits): uint32 compares
    # are unsigned, and one int32 argument type means one specialisation for every p.
    return THRESHOLD.to(tl.uint32, bitcast=True)


@triton.jit
def dropout_keep(seed, offset, bh, rows, cols, THRESHOLD):
    """Boolean keep-mask at query positions ``rows`` and key positions ``cols`` (int tensors that
    broadcast against each other, e.g. ``offs_m[:, None]`` and ``offs_n[None, :]``, or the transpose).

    Args:
        seed: int64 scalar (the Philox key). offset: int scalar (the counter's fourth word, mod 2^32).
        bh: ``b * H + h`` (int scalar): batch or sequence index times the query heads, plus the head.
        rows, cols: positions within the sequence (non-negative).
        THRESHOLD: int32 bit pattern of T (see the module docstring).
    """
    r2, c2 = tl.broadcast(rows, cols)
    c0 = (c2 >> 2).to(tl.uint32)
    c1 = r2.to(tl.uint32)
    c2w = (c1 * 0) + bh.to(tl.uint32)
    c3 = (c1 * 0) + offset.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2w, c3)
    word = c2 & 3
    r = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    return r >= _threshold_u32(THRESHOLD)


@triton.jit
def dropout_keep_block(seed, offset, bh, rows, start_n, THRESHOLD, BLOCK_N: tl.constexpr):
    """:func:`dropout_keep` for the tile ``rows[:, None]`` x ``start_n + arange(BLOCK_N)[None, :]``,
    one Philox evaluation per four keys; ``start_n`` and ``BLOCK_N`` multiples of 4."""
    tl.static_assert(BLOCK_N % 4 == 0, "dropout_keep_block needs BLOCK_N to be a multiple of 4")
    quads = (start_n >> 2) + tl.arange(0, BLOCK_N // 4)
    r2, q2 = tl.broadcast(rows[:, None], quads[None, :])
    c1 = r2.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, q2.to(tl.uint32), c1, (c1 * 0) + bh.to(tl.uint32),
                               (c1 * 0) + offset.to(tl.uint32))
    # interleave(interleave(w0, w2), interleave(w1, w3)) = [w0, w1, w2, w3] for each quad, in key order.
    r = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return r >= _threshold_u32(THRESHOLD)


@triton.jit
def dropout_mask_kernel(
    # pointers
    MASK, RNG,
    # sizes
    H, LQ, LK, THRESHOLD,
    # strides
    stride_mb, stride_mh, stride_mm, stride_mn,
    # constexpr flags
    QUADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Materialise the keep-mask of (B, H, LQ, LK) into ``MASK`` (int8, any strides).

    Grid: (cdiv(LQ, BLOCK_M), B * H, cdiv(LK, BLOCK_N)). ``RNG``: int64 (seed, offset). ``QUADS``:
    use :func:`dropout_keep_block` (BLOCK_N a multiple of 4) instead of :func:`dropout_keep`; both give
    the same mask, which tests check at several tile sizes.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_n = tl.program_id(2)
    seed = tl.load(RNG)
    offset = tl.load(RNG + 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if QUADS:
        keep = dropout_keep_block(seed, offset, bh, rows, pid_n * BLOCK_N, THRESHOLD, BLOCK_N)
    else:
        keep = dropout_keep(seed, offset, bh, rows[:, None], cols[None, :], THRESHOLD)
    b = bh // H
    h = bh % H
    base = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    ptrs = base + rows[:, None].to(tl.int64) * stride_mm + cols[None, :].to(tl.int64) * stride_mn
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < LQ) & (cols[None, :] < LK))
