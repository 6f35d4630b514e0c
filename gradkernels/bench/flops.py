"""The FLOP formulas every benchmark uses, in one place.

Counting conventions (the ones FlashAttention's and Triton's tutorials report, so numbers compare):

- A multiply-add is 2 FLOPs. Elementwise work (bias, activation, softmax, scaling) is not counted.
- Linear ``y = x @ W^T``: ``2*M*N*K`` per matmul. Forward is one matmul; backward is two (``dX = dY @ W``
  and ``dW = dY^T @ X``) when both gradients are needed, as in every benchmark here.
- Attention: forward ``4*B*H*Lq*Lk*D`` (``Q K^T`` and ``P V``, each ``2*B*H*Lq*Lk*D``), halved under causal
  masking; backward 2.5x forward (five matmuls against two, the recomputation of ``S`` included).
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")

# Backward matmuls per forward matmul.
LINEAR_BWD_FACTOR = 2.0
ATTENTION_BWD_FACTOR = 2.5


def _mode_factor(mode: str, bwd_factor: float) -> float:
    if mode == "fwd":
        return 1.0
    if mode == "bwd":
        return bwd_factor
    if mode == "fwd+bwd":
        return 1.0 + bwd_factor
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def linear_flops(m: int, n: int, k: int, mode: str = "fwd") -> float:
    """FLOPs of a linear layer ``(M, K) @ (K, N)`` in ``mode`` (both gradients in backward).

    Args:
        m: rows of ``x`` (tokens). n: output features. k: input features.
        mode: ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``.

    Returns:
        The FLOP count as a float.

    Raises:
        ValueError: an unknown mode.
    """
    return 2.0 * m * n * k * _mode_factor(mode, LINEAR_BWD_FACTOR)


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs of attention over (B, H, Lq, D) queries and (B, H, Lk, D) keys/values in ``mode``.

    Args:
        b: batch. h: query heads. lq, lk: query and key lengths. d: head dim.
        causal: half of the score matrix is masked out (the usual convention, exact for Lq == Lk up to
            the diagonal).
        mode: ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``.

    Returns:
        The FLOP count as a float.

    Raises:
        ValueError: an unknown mode.
    """
    fwd = 4.0 * b * h * lq * lk * d
    if causal:
        fwd *= 0.5
    return fwd * _mode_factor(mode, ATTENTION_BWD_FACTOR)


def tflops(flops: float, ms: float | None) -> float | None:
    """TFLOP/s from a FLOP count and a time in milliseconds (None when there is no time)."""
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def window_pairs(length: int, window: int) -> int:
    """Query-key pairs a causal sliding window of ``window`` keys (each query sees itself and the
    ``window - 1`` before it) leaves in a length-``length`` sequence: ``sum_i min(i + 1, window)``."""
    w = min(window, length)
    return w * (w + 1) // 2 + (length - w) * w


def window_attention_flops(b: int, h: int, length: int, d: int, window: int, mode: str = "fwd") -> float:
    """FLOPs of causal sliding-window attention (self-attention, Lq = Lk = ``length``): the attention
    formula over the pairs the window leaves (:func:`window_pairs`), not over the full square."""
    return 4.0 * b * h * window_pairs(length, window) * d * _mode_factor(mode, ATTENTION_BWD_FACTOR)


def varlen_attention_flops(lengths, h: int, d: int, causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs of a packed batch of self-attention sequences: the sum of :func:`attention_flops` per sequence
    (padding costs nothing because there is none)."""
    return sum(attention_flops(1, h, n, n, d, causal, mode) for n in lengths)
