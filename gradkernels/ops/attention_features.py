"""What attention calls add to plain attention (window, softcap, ALiBi, dropout, varlen): the launcher-facing
description, the validation of the public arguments, and the one routing hook.

Semantics (shared by every backend; ``i`` a query position, ``j`` a key position, within the sequence):

- Diagonal: key ``j`` is on query ``i``'s diagonal when ``j - i == diag``. ``gradkernels.attention`` and
  varlen use the bottom-right diagonal ``diag = Lk - Lq`` (per sequence for varlen); the SDPA drop-in's
  ``is_causal`` is top-left, ``diag = 0``.
- Window ``(left, right)``: ``j`` is visible iff ``diag - left <= j - i <= diag + right``; ``-1`` leaves
  that side unbounded. Causal is ``right = 0``. (The plain launchers' ``causal_offset`` is
  ``diag + right`` with no left bound.)
- Scores: ``s = scale * q.k``; with ``softcap > 0``, ``s = softcap * tanh(s / softcap)``; with ALiBi,
  ``s -= slope[b, h] * |j - i - diag|``. Then the softmax over the visible keys. The LSE is that of
  these scores (before dropout). Rows that see no key: output 0, LSE ``-inf``, zero gradients.
- Dropout: the probabilities are multiplied by ``keep / (1 - p)`` with the keep-mask of
  :mod:`gradkernels.dropout` (a function of seed, offset, b, h, i, j), regenerated in the backward.

Launchers (``gradkernels.ops.attention``: the attention kernels' feature flags) and their torch twins (``gradkernels.reference``) take
these as a :class:`Features` record; the custom ops take its fields flat.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from .attention import MAX_HEAD_DIM
from .common import FLOAT_DTYPES

__all__ = [
    "Features", "PLAIN", "features_supported_by_kernels", "check_window", "check_softcap", "check_dropout_p",
    "check_alibi_slopes", "check_features", "check_varlen_args",
]


class Features(NamedTuple):
    """What a call adds to plain attention. Every field's default is "off".

    Attributes:
        window_left, window_right: the window around the diagonal, ``-1`` unbounded (right 0: causal).
        softcap: ``> 0``: scores become ``softcap * tanh(score / softcap)``; 0: off.
        alibi_slopes: None, or fp32 (Hq,) or (B, Hq) (B: batch, or sequences for varlen), on q's device.
        dropout_p: drop probability in [0, 1); 0: off.
        rng_state: int64 (seed, offset) on q's device when ``dropout_p > 0``
            (:func:`gradkernels.dropout.new_rng_state`); None otherwise.
    """

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    rng_state: Optional[torch.Tensor] = None

    @property
    def is_plain(self) -> bool:
        """No feature beyond what the plain kernels do (a causal window ``(-1, 0)`` is plain)."""
        return (self.window_left == -1 and self.window_right in (-1, 0) and self.softcap == 0.0
                and self.alibi_slopes is None and self.dropout_p == 0.0)

    def names(self) -> tuple[str, ...]:
        """The features in use, for messages and logs."""
        used = []
        if self.window_left >= 0 or self.window_right > 0:
            used.append("window")
        if self.softcap > 0:
            used.append("softcap")
        if self.alibi_slopes is not None:
            used.append("alibi")
        if self.dropout_p > 0:
            used.append("dropout")
        return tuple(used)


PLAIN = Features()


# ----------------------------------------------------------------------------------------------------
# The routing hook
# ----------------------------------------------------------------------------------------------------


def features_supported_by_kernels(q: torch.Tensor, features: Features, *, varlen: bool) -> bool:
    """THE ROUTING HOOK: whether the Triton launchers run this call, or the torch twin does.

    Called by the custom ops ``gradkernels::attention_features_fwd/bwd`` and
    ``gradkernels::attention_varlen_fwd/bwd`` on the kernel backends ("triton", "interpreter"); on the
    "torch" backend the twins run regardless. When it returns True, the ops call
    ``gradkernels.ops.attention.attention_features_forward/backward`` (dense) or
    ``attention_varlen_forward/backward`` (varlen), which take the same arguments as the twins of the
    same names in :mod:`gradkernels.reference`.

    The kernels implement every feature and every combination of them, dense and varlen (constexpr flags
    of ``kernels/attention.py``: ``IS_VARLEN``, ``HAS_LEFT``, ``HAS_SOFTCAP``, ``HAS_ALIBI``,
    ``HAS_DROPOUT``), for every dtype and head dim the plain kernels take, so every call runs on them.
    Return False here for a combination that should go back to the torch twin.
    """
    del q, features, varlen
    return True


# ----------------------------------------------------------------------------------------------------
# Validation: TypeError / ValueError naming the argument, before anything is launched
# ----------------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_window(window_size, causal: bool) -> tuple[int, int]:
    """``(left, right)`` from a ``window_size`` argument; ``right = 0`` with ``causal``.

    Raises:
        TypeError: not a pair of ints. ValueError: an entry below -1.
    """
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
            _is_int(w) for w in window_size):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 for unbounded, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    for name, w in (("left", left), ("right", right)):
        if w < -1:
            raise ValueError(f"window_size {name} must be -1 (unbounded) or >= 0, got {w}")
    return left, (0 if causal else right)


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number (0 for off), got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0 for off), got {softcap}")
    return softcap


def check_dropout_p(dropout_p, name: str = "dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p}")
    return dropout_p


def check_alibi_slopes(alibi_slopes, batch: int, heads: int, device: torch.device, batch_name: str = "B"):
    """``alibi_slopes`` must be None or a float32 (Hq,) or (B, Hq) tensor on q's device."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({heads},) or ({batch_name}, Hq) = ({batch}, {heads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    return alibi_slopes


def check_features(*, causal, window_size, softcap, alibi_slopes, dropout_p, batch, heads, device,
                   batch_name="B") -> tuple[int, int, float, Optional[torch.Tensor], float]:
    """Validate the feature arguments of ``attention`` / ``attention_varlen``.

    Returns:
        ``(left, right, softcap, alibi_slopes, dropout_p)`` normalised (right 0 when causal).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = check_window(window_size, causal)
    return (left, right, check_softcap(softcap), check_alibi_slopes(alibi_slopes, batch, heads, device, batch_name),
            check_dropout_p(dropout_p))


def _values_checkable(t: torch.Tensor) -> bool:
    """Whether the values of ``t`` may be read on the host here: not while compiling (data-dependent) or
    capturing a CUDA graph (no synchronisation allowed), and not for meta tensors."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, *,
                      same_dtype=True) -> None:
    """Validate a varlen call: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), int32
    ``cu_seqlens_*`` of batch + 1 entries starting at 0, non-decreasing, ending at total, and no sequence
    longer than ``max_seqlen_*``.

    The values of ``cu_seqlens_*`` are read on the host (one small copy) in eager mode; under
    ``torch.compile`` and CUDA graph capture only their dtype, shape and device are checked.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim) for attention_varlen, got "
                             f"shape {tuple(t.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have k's tokens and heads {tuple(k.shape[:2])}, got v of shape {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k must have the head dim of q (D = {q.shape[2]}), got k of shape {tuple(k.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q's head count ({hq}) must be a multiple of k's and v's ({hkv}) (grouped-query attention)")
    for name, dim in (("q", q.shape[2]), ("v", v.shape[2])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all must be on one device")
        if same_dtype and t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all must have one dtype")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
    totals = {"cu_seqlens_q": q.shape[0], "cu_seqlens_k": k.shape[0]}
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (prefix sums of the sequence lengths), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D with batch + 1 >= 1 entries, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same number of entries (batch + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, (numbers.Integral, torch.SymInt)) or isinstance(m, bool):
            raise TypeError(f"{name} must be an int, got {type(m).__name__}")
        if isinstance(m, numbers.Integral) and m < 0:
            raise ValueError(f"{name} must be >= 0, got {m}")
    for (name, cu), max_name, m in zip((("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)),
                                       ("max_seqlen_q", "max_seqlen_k"), (max_seqlen_q, max_seqlen_k)):
        if not _values_checkable(cu):
            continue
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        if any(n < 0 for n in lengths):
            at = next(i for i, n in enumerate(lengths) if n < 0)
            raise ValueError(f"{name} must be non-decreasing, got {values[at]} then {values[at + 1]} at "
                             f"index {at}")
        if values[-1] != totals[name]:
            raise ValueError(f"{name} must end at the total number of tokens ({totals[name]}), got {values[-1]}")
        longest = max(lengths, default=0)
        if isinstance(m, numbers.Integral) and longest > m:
            raise ValueError(f"a sequence of {name} has length {longest}, more than {max_name} = {m}")
