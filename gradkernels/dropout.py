"""Attention dropout: the keep-mask contract, its torch implementation, and where seeds come from.

The mask (defined once in ``kernels/dropout.py``; this module's :func:`keep_mask` is the bitwise-identical
torch implementation, used by the torch backend and by tests): key ``j`` of query ``i`` in head ``h`` of
batch element (or varlen sequence) ``b`` is kept iff

    word (j & 3) of Philox4x32-10(counter = (j >> 2, i, b * H + h, offset mod 2^32),
                                  key = (seed mod 2^32, (seed >> 32) mod 2^32))  >=  T,

``T = min(ceil(p * 2^32), 2^32 - 1)`` (the uniform ``r / 2^32`` is ``>= p``), ``H`` the number of query
heads, ``i`` and ``j`` positions within the sequence. Kept probabilities are scaled by ``1 / (1 - p)``.
The mask depends on nothing else: not on tiles, head dims, the backend or the GPU. A varlen sequence
``s`` therefore gets the mask of batch element ``s`` of a dense call with the same seed.

Seeds. Each attention call with ``dropout_p > 0`` draws its ``rng_state`` (an int64 tensor
``(seed, offset)`` on the inputs' device) with :func:`new_rng_state`: one ``torch.randint`` from the
default generator of that device (``torch.default_generator`` for CPU tensors, the CUDA device's
default generator for CUDA tensors), so it advances that generator like any random op, and a run is
reproducible after ``torch.manual_seed``. The state is saved for the backward, which regenerates the
mask from it (the mask is never stored). The draw is a device op, never read back by the host: under
CUDA graph capture each replay draws a new seed (torch's graph-safe Philox offsets), and under
``torch.compile`` it is traced as a random op of the graph (Inductor then draws it from its own random
stream, reproducible after ``torch.manual_seed`` but not the eager value unless
``torch._inductor.config.fallback_random = True``).

Not torch's mask: ``torch.nn.functional.dropout`` and torch's SDPA use other streams, so masks differ
bitwise from torch's; the distribution (independent keeps with probability ``1 - p``) is the same.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "philox4x32", "keep_mask", "dropout_mask", "dropout_mask_varlen", "new_rng_state", "threshold",
    "threshold_bits",
]

_MASK32 = 0xFFFFFFFF
# Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011; the values tl.philox uses).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int):
    """High and low 32-bit words of ``a * m`` for int64 tensors ``a`` in [0, 2^32) and a constant ``m``
    below 2^32, without overflowing int64: ``m`` is split into 16-bit halves."""
    mh, ml = m >> 16, m & 0xFFFF
    t = a * ml  # < 2^48
    u = a * mh + (t >> 16)  # < 2^48 + 2^32
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def _word(x, like: torch.Tensor) -> torch.Tensor:
    """A 32-bit word (mod 2^32) as an int64 tensor: Python ints and int tensors alike (negative
    values by their two's complement bits, as the kernels' casts take them)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=torch.int64) & _MASK32
    return torch.as_tensor(int(x) & _MASK32, dtype=torch.int64, device=like.device)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 words: the four output words (int64 in [0, 2^32)).

    ``c0..c3`` broadcast against each other; ``k0``, ``k1`` are Python ints or int64 tensors (the key).
    The round and key schedule of Random123 (and of ``tl.philox`` with 32-bit words).
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(*(t & _MASK32 for t in (c0, c1, c2, c3)))
    k0 = k0 & _MASK32
    k1 = k1 & _MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _check_p(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def threshold(dropout_p: float) -> int:
    """``T = min(ceil(p * 2^32), 2^32 - 1)``: a key is kept iff its 32-bit random word is ``>= T``."""
    _check_p(dropout_p)
    return min(math.ceil(float(dropout_p) * 4294967296.0), _MASK32)


def threshold_bits(dropout_p: float) -> int:
    """:func:`threshold` as the int32 with the same bits (what the kernels take: one argument type)."""
    t = threshold(dropout_p)
    return t - (1 << 32) if t >= (1 << 31) else t


def _seed_words(seed, like):
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=like.device, dtype=torch.int64)
        return s & _MASK32, (s >> 32) & _MASK32  # arithmetic shift, then the low word: the uint64 bits
    s = int(seed) & ((1 << 64) - 1)
    return s & _MASK32, s >> 32


def keep_mask(seed, offset, bh, rows, cols, dropout_p: float) -> torch.Tensor:
    """The keep-mask at broadcastable positions: bool tensor, True where kept.

    Args:
        seed: int (mod 2^64) or int64 scalar tensor. offset: int or int tensor (mod 2^32).
        bh: ``b * H + h`` (int tensor, broadcastable). rows, cols: query and key positions (int tensors).
        dropout_p: the drop probability, in [0, 1).
    """
    like = rows
    bh = torch.as_tensor(bh, dtype=torch.int64, device=like.device)
    k0, k1 = _seed_words(seed, like)
    words = philox4x32(cols >> 2, rows, bh, _word(offset, like), k0, k1)
    sel = cols & 3
    r = torch.where(sel == 0, words[0], torch.where(sel == 1, words[1], torch.where(sel == 2, words[2], words[3])))
    return r >= threshold(dropout_p)


def dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, seed, offset=0, *,
                 device=None) -> torch.Tensor:
    """Materialise the keep-mask of a dense attention call: bool (batch, heads, seqlen_q, seqlen_k).

    ``attention(q, k, v, dropout_p=p)`` with the ``rng_state`` ``(seed, offset)`` multiplies the
    softmax probabilities by ``mask / (1 - p)`` (heads are the query heads; GQA included). Computed
    in torch, one Philox evaluation per four keys.

    Args:
        batch, heads, seqlen_q, seqlen_k: the call's sizes (B, Hq, Lq, Lk).
        dropout_p: in [0, 1).
        seed: int (mod 2^64) or an int64 scalar tensor; offset: int or int tensor (mod 2^32), e.g. the
            two entries of an ``rng_state`` from :func:`new_rng_state`.
        device: where to compute it (default: the seed's device for a tensor seed, else CPU).

    Raises:
        ValueError / TypeError: negative sizes, ``dropout_p`` outside [0, 1).
    """
    for name, n in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    _check_p(dropout_p)
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else "cpu"
    quads = -(-seqlen_k // 4)
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    rows = torch.arange(seqlen_q, device=device, dtype=torch.int64).view(1, 1, seqlen_q, 1)
    quad = torch.arange(quads, device=device, dtype=torch.int64).view(1, 1, 1, quads)
    k0, k1 = _seed_words(seed, rows)
    words = philox4x32(quad, rows, bh, _word(offset, rows), k0, k1)
    r = torch.stack(words, dim=-1).reshape(batch, heads, seqlen_q, 4 * quads)[..., :seqlen_k]
    return r >= threshold(dropout_p)


def dropout_mask_varlen(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, heads: int, dropout_p: float, seed,
                        offset=0) -> list[torch.Tensor]:
    """The keep-masks of a varlen call, one bool (heads, Lq_s, Lk_s) tensor per sequence ``s``.

    Sequence ``s`` gets batch element ``s`` of :func:`dropout_mask` (positions within the sequence).
    """
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    if len(lq) != len(lk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(lq) + 1} and "
                         f"{len(lk) + 1}")
    full = dropout_mask(len(lq), heads, max(lq, default=0), max(lk, default=0), dropout_p, seed, offset,
                        device=cu_seqlens_q.device)
    return [full[s, :, :a, :c] for s, (a, c) in enumerate(zip(lq, lk))]


def new_rng_state(device) -> torch.Tensor:
    """The ``rng_state`` of one dropout call: int64 ``(seed, offset)`` on ``device``, one draw from that
    device's default generator (see the module docstring). Reproducible after ``torch.manual_seed``."""
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=device)
