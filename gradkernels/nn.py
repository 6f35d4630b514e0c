"""Drop-in modules: :class:`Linear` (a ``torch.nn.Linear`` subclass) and attention modules."""

from __future__ import annotations

import torch

from . import functional as F
from .ops.attention import MAX_HEAD_DIM
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


class MultiHeadAttention(torch.nn.Module):
    """Self-attention layer on the gradkernels kernels: projections through :func:`gradkernels.linear`,
    attention through :func:`gradkernels.attention` (grouped-query when ``num_kv_heads < num_heads``).

    Input and output (B, L, embed_dim). The projected (B, L, H, head_dim) tensors are read by the
    attention kernels in place (no transposed copies).

    Args:
        embed_dim: model width; a multiple of ``num_heads``.
        num_heads: query heads; ``head_dim = embed_dim // num_heads`` (at most ``MAX_HEAD_DIM``, 256).
        num_kv_heads: key/value heads (a divisor of ``num_heads``); ``num_heads`` when None.
        causal: each position attends to itself and earlier positions only.
        bias: whether the four projections have a bias.
        device, dtype: of the parameters, as for ``torch.nn.Linear``.
        window_size: ``(left, right)`` sliding window, as :func:`gradkernels.attention` (``(w - 1, 0)``
            with ``causal=True``: each position sees itself and the ``w - 1`` before it); -1 unbounded.
        softcap: attention-logit soft-capping (Gemma 2), 0 for off.
        dropout: attention-weight dropout probability, applied in training mode only (``module.train()``),
            with gradkernels' Philox mask (:func:`gradkernels.attention`'s ``dropout_p``).

    Raises:
        ValueError / TypeError: sizes that do not divide as described, a bad window, softcap or dropout.
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, causal=False, bias=True, device=None,
                 dtype=None, *, window_size=(-1, -1), softcap=0.0, dropout=0.0):
        super().__init__()
        from .ops import attention_features

        attention_features.check_window(window_size, False)
        self.window_size = tuple(int(w) for w in window_size)
        self.softcap = attention_features.check_softcap(softcap)
        self.dropout = attention_features.check_dropout_p(dropout, "dropout")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, n in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if embed_dim // num_heads > MAX_HEAD_DIM:
            raise ValueError(f"head_dim = embed_dim // num_heads must be at most {MAX_HEAD_DIM}, "
                             f"got {embed_dim // num_heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        kv_dim = num_kv_heads * self.head_dim
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = Linear(embed_dim, embed_dim, **kw)
        self.k_proj = Linear(embed_dim, kv_dim, **kw)
        self.v_proj = Linear(embed_dim, kv_dim, **kw)
        self.out_proj = Linear(embed_dim, embed_dim, **kw)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (batch, seq_len, embed_dim={self.embed_dim}), got {got}")
        b, length, _ = x.shape

        def heads(t, n):  # (B, L, n * hd) -> (B, n, L, hd), a view
            return t.view(b, length, n, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x), self.num_heads)
        k = heads(self.k_proj(x), self.num_kv_heads)
        v = heads(self.v_proj(x), self.num_kv_heads)
        out = F.attention(q, k, v, causal=self.causal, window_size=self.window_size, softcap=self.softcap,
                          dropout_p=self.dropout if self.training else 0.0)
        # The kernels write out in (B, L, H, hd) memory order when q is laid out so: a free reshape.
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))

    def extra_repr(self):
        extra = "".join(f", {name}={value!r}" for name, value, off in (
            ("window_size", self.window_size, (-1, -1)), ("softcap", self.softcap, 0.0),
            ("dropout", self.dropout, 0.0)) if value != off)
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}{extra}")
