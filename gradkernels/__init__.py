"""gradkernels: Triton GPU kernels for training, a fused linear layer and Flash-style attention.

See README.md for the API, what runs where, and the limits.
"""

import logging

from . import dropout, nn, reference
from ._device import backend_for
from .dropout import dropout_mask, dropout_mask_varlen
from .functional import attention, attention_varlen, linear, scaled_dot_product_attention
from .patching import PatchSummary, patch, unpatch, use_kernels

__version__ = "0.1.0"

logger = logging.getLogger("gradkernels")

__all__ = [
    "PatchSummary",
    "attention",
    "attention_varlen",
    "backend_for",
    "dropout",
    "dropout_mask",
    "dropout_mask_varlen",
    "linear",
    "logger",
    "nn",
    "patch",
    "reference",
    "scaled_dot_product_attention",
    "unpatch",
    "use_kernels",
]
