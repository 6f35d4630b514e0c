"""A small decoder-only transformer language model, written in plain PyTorch, and its training loop.

Used by the end-to-end test (``tests/test_e2e.py``: the same model trained plain and patched by
:func:`gradkernels.patch` must give the same losses) and by the training-step benchmark
(``bench/train_step.py``). Nothing in it knows about gradkernels: it is an ordinary model built from
``torch.nn.Linear`` and ``torch.nn.functional.scaled_dot_product_attention``, which is what
:func:`gradkernels.patch` is meant to be dropped into.

The model: token + learned position embeddings, ``n_layers`` pre-LayerNorm blocks (causal grouped-query
self-attention, GELU MLP), a final LayerNorm and an untied LM head. ``attn_impl`` picks how attention
is computed: ``"sdpa"`` (``F.scaled_dot_product_attention``, what ``patch`` routes) or ``"naive"``
(composed matmul + softmax, materialising the full L x L score matrix per head: the baseline that runs
out of memory first).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLMConfig", "TinyLM", "make_batches", "train_losses", "set_seed"]

# enable_gqa appeared in torch 2.5; older versions get K/V heads repeated explicitly.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclasses.dataclass
class TinyLMConfig:
    """Sizes of :class:`TinyLM`. The defaults are the model of the end-to-end test (issue 6)."""

    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 64
    max_seq_len: int = 64
    bias: bool = True
    attn_impl: str = "sdpa"

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.attn_impl not in ("sdpa", "naive"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'naive', got {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        b, length, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        q = self.q_proj(x).view(b, length, cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, length, cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, length, cfg.n_kv_heads, hd).transpose(1, 2)
        if cfg.attn_impl == "naive":
            o = _naive_causal_attention(q, k, v)
        elif _SDPA_HAS_GQA:
            # Looked up on F at call time, so gradkernels.patch / use_kernels can route it.
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        else:  # pragma: no cover - torch < 2.5
            rep = cfg.n_heads // cfg.n_kv_heads
            o = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
            )
        return self.o_proj(o.transpose(1, 2).reshape(b, length, cfg.n_heads * hd))


def _naive_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v with the full score matrix in memory (autograd keeps it)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    length = q.shape[-2]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.act = nn.GELU()
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(self.act(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    """Decoder-only LM: ``forward(idx, targets=None)`` gives logits, or the mean next-token loss.

    Args:
        cfg: sizes; see :class:`TinyLMConfig`.
        checkpoint: recompute each block in backward (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(self, cfg: TinyLMConfig, checkpoint: bool = False):
        super().__init__()
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx, targets=None, position_ids=None):
        """``position_ids``: (L,) global positions of ``idx``'s tokens (default ``arange(L)``), e.g. a
        shard of a longer sequence under context parallelism (``gradkernels.distributed.shard_positions``)."""
        length = idx.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len {self.cfg.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(length, device=idx.device)
        x = self.tok(idx) + self.pos(position_ids)
        for block in self.blocks:
            if self.checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in fp32 (fp64 models keep fp64)
            logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def make_batches(cfg: TinyLMConfig, steps: int, batch: int, seq_len: int, *, seed: int = 0, device="cpu"):
    """``steps`` (inputs, targets) pairs of token ids with learnable structure.

    Tokens follow a fixed random successor table (a first-order Markov chain; 10% of positions are
    replaced by random tokens), so the loss falls visibly within a few optimizer steps; on pure noise it
    would stay at log(vocab_size) and a training run would show nothing.
    """
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(cfg.vocab_size, generator=g)
    out = []
    for _ in range(steps):
        data = torch.empty(batch, seq_len + 1, dtype=torch.long)
        data[:, 0] = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
        for t in range(1, seq_len + 1):
            data[:, t] = successor[data[:, t - 1]]
            noise = torch.rand(batch, generator=g) < 0.1
            data[noise, t] = torch.randint(0, cfg.vocab_size, (int(noise.sum()),), generator=g)
        data = data.to(device)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def train_losses(model: nn.Module, batches, *, lr: float = 1e-2, weight_decay: float = 0.01, autocast_dtype=None):
    """Train ``model`` with AdamW on ``batches`` (one step each); returns the loss of every step.

    Args:
        model: a :class:`TinyLM` (plain or patched).
        batches: a list of (inputs, targets) as from :func:`make_batches`.
        lr, weight_decay: AdamW hyperparameters.
        autocast_dtype: run forward under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).

    Returns:
        A list of floats, the loss before each update.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    device_type = next(model.parameters()).device.type
    losses = []
    for inputs, targets in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(inputs, targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
