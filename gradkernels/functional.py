"""Functional API: :func:`linear`, :func:`attention`, :func:`scaled_dot_product_attention`."""

from __future__ import annotations

import torch

from . import reference
from ._device import backend_for
from .autograd import LinearFunction
from .ops.linear import check_linear_args


def _autocast(device_type, *tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for ``device_type``."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def linear(x, weight, bias=None, activation=None):
    """``act(x @ weight^T + bias)`` with bias and activation fused into the matmul.

    Same result as ``act(torch.nn.functional.linear(x, weight, bias))``.

    Args:
        x: (..., in_features) tensor; any leading dims, any strides.
        weight: (out_features, in_features), the layout of ``torch.nn.Linear``.
        bias: (out_features,) or None.
        activation: None, "relu", "gelu" (erf, like ``nn.GELU()``), "gelu_tanh" or "silu".

    Returns:
        (..., out_features) tensor in the input dtype (the autocast dtype under ``torch.autocast``).

    Raises:
        TypeError: a non-tensor, an integer tensor, or mixed dtypes (outside autocast).
        ValueError: shapes that do not fit, tensors on different devices, an unknown activation.
    """
    check_linear_args(x, weight, bias, activation, same_dtype=False)
    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    check_linear_args(x, weight, bias, activation)
    if backend_for(x) == "torch":
        return reference.linear(x, weight, bias, activation)
    return LinearFunction.apply(x, weight, bias, activation)
