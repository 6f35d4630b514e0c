"""Attention memory: no (Lq x Lk) tensor per head is saved for backward or allocated at all.

Measured on the CPU through torch's own hooks: ``saved_tensors_hooks`` sees every tensor autograd keeps
for backward, a ``TorchDispatchMode`` sees every tensor any torch op creates (the kernels run under
Triton's interpreter here). The naive ``reference.AttentionFunction`` is measured the same way, so
each check is shown to fail on an implementation that does keep the score matrix.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradkernels
from gradkernels import reference
from utils import DEVICE, ON_GPU


def _inputs(b, hq, hkv, lq, lk, d, dtype=torch.float32):
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v


def _saved(fn, *args):
    """Run ``fn(*args)`` and return the tensors autograd saved for its backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


class _AllocationLog(TorchDispatchMode):
    """Largest tensor (in bytes) any torch op creates while active.

    Bytes, not elements: under the interpreter Triton copies each argument's storage as a uint8
    tensor (as many elements as the argument has bytes), which is not an attention temporary.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return result


def _ours(q, k, v):
    return gradkernels.attention(q, k, v, causal=True)


def _naive(q, k, v):
    return reference.naive_attention(q, k, v, causal=True)


def test_saved_tensors_hold_no_score_matrix():
    b, hq, hkv, lq, lk, d = 1, 4, 2, 256, 192, 16
    per_head_scores = lq * lk
    q, k, v = _inputs(b, hq, hkv, lq, lk, d)
    _, saved = _saved(_ours, q, k, v)
    assert saved, "nothing was saved: the kernels' Function did not run"
    for t in saved:
        assert t.numel() < per_head_scores, f"saved a {tuple(t.shape)} tensor"
    # q, k, v, out, the LSE and its rounding residual, nothing else.
    assert sorted(t.numel() for t in saved) == sorted([q.numel(), k.numel(), v.numel(), q.numel(),
                                                       b * hq * lq, b * hq * lq])
    _, naive_saved = _saved(_naive, q, k, v)
    assert max(t.numel() for t in naive_saved) >= per_head_scores  # the check can fail


def test_saved_bytes_at_1024_are_under_an_eighth_of_the_naive_path():
    """Per query row we keep q, out (D each), k, v (D each, Lk = Lq) and the LSE with its residual:
    (4D + 2) elements against the naive (3D + Lk); under 1/8 once Lk > 29 D + 16 (D = 32: Lk >= 944)."""
    q, k, v = _inputs(1, 1, 1, 1024, 1024, 32)
    _, saved = _saved(_ours, q, k, v)
    _, naive_saved = _saved(_naive, q, k, v)
    ours = sum(t.numel() * t.element_size() for t in saved)
    naive = sum(t.numel() * t.element_size() for t in naive_saved)
    assert ours * 8 < naive, f"saved {ours} bytes, naive {naive}"


def test_no_score_sized_tensor_is_ever_allocated():
    """Forward and backward create no tensor as large as one head's scores, even in half precision
    (Lq * Lk * 2 bytes), not even a temporary; q, the largest input, is 4x smaller here."""
    b, hq, hkv, lq, lk, d = 1, 2, 1, 256, 256, 16
    q, k, v = _inputs(b, hq, hkv, lq, lk, d)
    grad = torch.randn(b, hq, lq, d, device=DEVICE)
    log = _AllocationLog()
    with log:
        out = _ours(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
    one_head_fp16 = lq * lk * 2
    assert 0 < log.largest < one_head_fp16, f"a tensor of {log.largest} bytes was created"
    naive_log = _AllocationLog()
    with naive_log:
        out = _naive(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
    assert naive_log.largest >= one_head_fp16  # the check can fail


@pytest.mark.skipif(not ON_GPU, reason="peak device memory is measured on CUDA only")
def test_peak_gpu_memory_is_far_below_one_score_matrix():
    b, h, length, d = 1, 8, 8192, 64
    q, k, v = _inputs(b, h, h, length, length, d, dtype=torch.bfloat16)
    grad = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = _ours(q, k, v)
    torch.autograd.grad(out, (q, k, v), grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    scores = b * h * length * length * q.element_size()
    assert peak * 8 < scores, f"peak {peak} bytes against {scores} for one bf16 score matrix"
