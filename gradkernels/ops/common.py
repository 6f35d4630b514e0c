"""Facts every launcher shares: the floating dtypes the kernels take, the dtype they accumulate in, and the
activations the linear kernels fuse (with their torch semantics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in for inputs of ``dtype``: fp64 for fp64, fp32 otherwise.

    Also the dtype of attention's per-row statistics (LSE, its residual, Delta) and of split-K partials.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _silu_backward(grad, pre):
    if torch.is_grad_enabled():
        # aten.silu_backward has no derivative: torch's autograd itself uses this composite form
        # (infinitely_differentiable_silu_backward) whenever grad mode is on.
        s = torch.sigmoid(pre)
        return grad * s * (1.0 + pre * (1.0 - s))
    return torch.ops.aten.silu_backward(grad, pre)


# The activations gradkernels.linear fuses: name -> (torch forward, torch backward ``grad * act'(pre)``).
# The backward is the aten op torch's autograd uses, so results are torch's (NaN and +-inf included) and
# differentiable in grad mode (the double backward of gradkernels.linear builds on it). Adding an
# activation: an entry here, its branch in kernels/_common.py (apply_activation, activation_grad: an
# unknown name fails to compile there) and its error constants in gradkernels.testing.bounds.
_ACTIVATION_FNS = {
    None: (lambda x: x, lambda grad, pre: grad),
    "relu": (F.relu, lambda grad, pre: torch.ops.aten.threshold_backward(grad, pre, 0)),
    "gelu": (F.gelu, lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre, approximate="none")),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")),
    "silu": (F.silu, _silu_backward),
}
ACTIVATIONS = tuple(_ACTIVATION_FNS)


def activation_fns(activation):
    """``(forward, backward)`` torch functions of an activation; ValueError for an unknown name."""
    try:
        return _ACTIVATION_FNS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}") from None
