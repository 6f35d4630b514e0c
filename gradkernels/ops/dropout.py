"""Launcher of the standalone dropout-mask kernel (``kernels/dropout.py``): validate -> allocate -> launch.

The attention kernels generate the same mask inline (``dropout_keep`` / ``dropout_keep_block``); this
kernel materialises it, for :func:`gradkernels.dropout_mask` on a GPU and for the tests that check the
Triton helpers against the torch implementation (``gradkernels.dropout.keep_mask``) bitwise.
"""

from __future__ import annotations

import torch
import triton

from .. import dropout as dropout_rng
from ..kernels import dropout as kernels

# Tile of the mask kernel: any (BLOCK_M, BLOCK_N) gives the same mask; this one is small enough for the
# interpreter and wide enough to store whole rows of bytes on a GPU.
DEFAULT_BLOCK = (32, 64)


def dropout_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, rng_state, *, block=DEFAULT_BLOCK, quads=True,
                 out=None):
    """The keep-mask of (batch, heads, seqlen_q, seqlen_k) by :func:`kernels.dropout.dropout_mask_kernel`.

    Args:
        rng_state: int64 ``(seed, offset)`` tensor on the device to compute on.
        block: ``(BLOCK_M, BLOCK_N)``, powers of two (BLOCK_N >= 4 with ``quads``).
        quads: one Philox per four keys (``dropout_keep_block``) or one per key (``dropout_keep``).
        out: optional int8 (or bool) buffer of the mask's shape, any strides.

    Returns:
        bool tensor (batch, heads, seqlen_q, seqlen_k) on ``rng_state``'s device.
    """
    if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError("rng_state must be an int64 tensor of 2 elements (seed, offset)")
    block_m, block_n = block
    thr = dropout_rng.threshold_bits(dropout_p)
    shape = (batch, heads, seqlen_q, seqlen_k)
    buf = torch.empty(shape, dtype=torch.int8, device=rng_state.device) if out is None else out.view(torch.int8)
    if buf.numel() == 0:
        return buf.view(torch.bool)
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads, triton.cdiv(seqlen_k, block_n))
    kernels.dropout_mask_kernel[grid](
        buf, rng_state.contiguous(), heads, seqlen_q, seqlen_k, thr, *buf.stride(),
        QUADS=quads, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return buf.view(torch.bool)
