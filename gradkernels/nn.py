"""Drop-in modules: :class:`Linear` (a ``torch.nn.Linear`` subclass) and attention modules."""

from __future__ import annotations

import torch

from . import functional as F
from .reference import ACTIVATIONS


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` computed by the fused Triton kernels, with an optional fused activation.

    Same parameters and state_dict as ``torch.nn.Linear`` (each loads the other's).

    Args:
        in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
        activation: None, "relu", "gelu", "gelu_tanh" or "silu", applied to the output.
    """

    def __init__(self, in_features, out_features, bias=True, activation=None, device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, activation=None) -> "Linear":
        """A gradkernels Linear that shares ``module``'s parameters (no copies)."""
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"module must be a torch.nn.Linear, got {type(module).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight = module.weight
        new.bias = module.bias
        new.activation = activation
        new.train(module.training)
        return new

    def forward(self, x):
        return F.linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation!r}"
