"""Facts every launcher shares: the floating dtypes the kernels take and the dtype they accumulate in."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in for inputs of ``dtype``: fp64 for fp64, fp32 otherwise.

    Also the dtype of attention's per-row statistics (LSE, its residual, Delta) and of split-K partials.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
