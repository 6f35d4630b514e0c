"""Attention at very large logits (attention-logit growth): the backward must be as exact as torch's.

With scores around 1e4-4e5 an fp32 LSE is off by up to 2^-8 of a unit, and a backward that recomputes
``P = exp(s - LSE)`` from it inherits that error (dV was off by 0.17 where torch's own fp32 path was off
by 6e-7). The kernels keep the LSE's base-2 rounding residual (``lse_lo``) and subtract the row maximum
from the unrounded product (one fma), so P is recomputed to the rounding of small numbers.

Inputs are small integers (plus a large common component), so every dot product is exact in fp32 and
fp64 whatever the summation order: the errors compared are those of the softmax alone, on any BLAS.
The same-dtype oracle is torch's softmax composition (``torch.softmax(q k^T * scale) v``), which computes
``s - max`` from the exact scores and is accurate here (torch's CPU SDPA is off by up to 1.2 in dQ on
these inputs, the composition by 6e-4).

One error is FlashAttention's own and is bounded separately: dS = P * (dP - Delta) with
``Delta = rowsum(dO * O)`` from the stored output. Where a row is nearly one-hot, dP - Delta cancels to
a few ulps of ``|dO| |O|``, which dQ and dK multiply by ``scale * |K|`` (resp. ``|Q|``); torch's
composition sums ``P * dP`` from the same rounded dP and cancels exactly. Recomputing Delta that way
would need another pass over the keys.
"""

import math

import pytest
import torch

import gradkernels
from gradkernels.ops import attention as attention_ops
from gradkernels import testing
from utils import DEVICE, FACTOR_GRAD, FACTOR_OUTPUT, assert_close

B, HQ, HKV, LQ, LK, D = 1, 4, 2, 37, 45, 16


def _integer_qkv(base):
    """fp64 q, k whose dot products are exact integers of about ``base**2`` (a common component) give or
    take a few hundred; v and the output gradient random."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-4, 5, (B, HQ, LQ, D), generator=gen).double()
    k = torch.randint(-4, 5, (B, HKV, LK, D), generator=gen).double()
    q[..., 0], k[..., 0] = base, base
    v = torch.randn(B, HKV, LK, D, generator=gen, dtype=torch.float64)
    do = torch.randn(B, HQ, LQ, D, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, do)]


def _softmax_attention(q, k, v, causal, scale):
    """torch's softmax composition (the accurate same-dtype oracle here): ``softmax(q k^T * scale) v``."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        visible = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + lk - lq
        s = s.masked_fill(~visible, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, dim=-1)) @ v


def _run(fn, tensors, dtype):
    q, k, v, do = tensors
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return (out.detach(), *grads)


def _delta_floor(q, k, v, do, scale, dtype):
    """Bound of the Delta-cancellation error in dQ and dK: a few ulps of ``max|dO| max|V| Dv`` (|O| is at
    most max|V|), times ``scale * max|K|`` for dQ and ``scale * max|Q| * group`` for dK."""
    delta_err = 4 * torch.finfo(dtype).eps * do.abs().max().item() * v.abs().max().item() * v.shape[-1]
    group = q.shape[1] // k.shape[1]
    return (abs(scale) * k.abs().max().item() * delta_err,
            abs(scale) * q.abs().max().item() * delta_err * group)


# base 128, scale 1: scores ~1.6e4 with gaps of a few units (a soft softmax among the top keys);
# scale 16: scores ~2.6e5, nearly one-hot. Powers of two keep torch's own scaled scores exact.
@pytest.mark.parametrize("scale", [1.0, 16.0])
@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_backward_as_exact_as_torch(causal, scale):
    tensors = _integer_qkv(base=128.0)
    dtype = torch.float32
    ref = _run(lambda q, k, v: _softmax_attention(q, k, v, causal, scale), tensors, torch.float64)
    same = _run(lambda q, k, v: _softmax_attention(q, k, v, causal, scale), tensors, dtype)
    ours = _run(lambda q, k, v: gradkernels.attention(q, k, v, causal=causal, scale=scale), tensors, dtype)
    # out and dV: the usual rule (dV is what the LSE residual fixes: it was off by 1e-2 here).
    assert_close(ours[0], same[0], ref[0], 2, "out")
    assert_close(ours[3], same[3], ref[3], 3, "dv")
    for i, name, floor in ((1, "dq", _delta_floor(*tensors, scale, dtype)[0]),
                           (2, "dk", _delta_floor(*tensors, scale, dtype)[1])):
        err = (ours[i].double() - ref[i]).abs().max().item()
        torch_err = (same[i].double() - ref[i]).abs().max().item()
        assert err <= 3 * torch_err + floor, f"{name}: {err:.3e} > 3 x {torch_err:.3e} + {floor:.2e}"


def test_returned_lse_is_the_natural_log_sum_exp():
    q, k, v, _ = _integer_qkv(base=128.0)
    _, lse = gradkernels.attention(q.float(), k.float(), v.float(), scale=1.0, return_lse=True)
    group = HQ // HKV
    exact = torch.logsumexp(q.double() @ k.double().repeat_interleave(group, 1).transpose(-2, -1), dim=-1)
    # One rounding of a number near 1.6e4 (fp32 ulp 2^-9) and the fp32 log of the row sum.
    assert (lse.double() - exact).abs().max().item() <= 2 * 2.0**-9


def test_split_and_exact_lse_round_trip():
    exact = torch.tensor([-float("inf"), -3.25, 0.0, 1.0e-3, 17.3, 1.6e4 + 1 / 3, 2.6e5 + math.pi],
                         dtype=torch.float64)
    lse, lo = attention_ops.split_lse(exact, torch.float32)
    assert lse.dtype == lo.dtype == torch.float32
    assert torch.equal(lse, exact.float())
    assert lo[0] == 0
    back = attention_ops.exact_lse(lse, lo)
    assert back[0] == -float("inf")
    # The pair keeps ~fp32 precision relative to the residual, not to the LSE: far below fp32 ulps.
    assert (back[1:] - exact[1:]).abs().max().item() <= 1e-9 * exact[1:].abs().max().item()


def test_forward_residual_normalises_the_recomputed_probabilities():
    """``exp2(q.k * qk_scale - (fl(lse * log2 e) + lse_lo))`` sums to 1 over each row, as the backward
    recomputes P; the rounded LSE alone leaves the sum off by up to 2^-8."""
    q, k, v, _ = _integer_qkv(base=128.0)
    scale = 1.0
    _, lse, lse_lo = attention_ops.attention_forward(q.float(), k.float(), v.float(), None, scale)
    group = HQ // HKV
    dots = q @ k.repeat_interleave(group, 1).transpose(-2, -1)  # exact integers
    qk_scale = torch.tensor(scale * 1.4426950408889634, dtype=torch.float32).double()  # the kernels' fp32
    hi = (lse * 1.4426950408889634).double()  # fl32(lse * log2 e), as the backward computes it
    row_sum = torch.exp2(dots * qk_scale - (hi + lse_lo.double())[..., None]).sum(-1)
    assert (row_sum - 1).abs().max().item() <= 1e-5
    without = torch.exp2(dots * qk_scale - hi[..., None]).sum(-1)
    assert (without - 1).abs().max().item() >= 1e-4


@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("causal", [False, True])
def test_non_positive_scales(scale, causal):
    # The kernels take the row maximum of unscaled scores: a negative or zero scale is folded into Q.
    gen = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE)
                   for s in ((1, 2, 37, 40), (1, 1, 45, 40), (1, 1, 45, 24), (1, 2, 37, 24)))
    ref = testing.attention_reference(q, k, v, do, causal=causal, scale=scale)
    for dtype in (torch.float32, torch.float64):
        cast = [t.to(dtype) for t in (q, k, v, do)]
        floors = testing.attention_bounds(*cast, causal=causal, scale=scale)
        same = _run(lambda a, b, c: _softmax_attention(a, b, c, causal, scale), cast, dtype)
        ours = _run(lambda a, b, c: gradkernels.attention(a, b, c, causal=causal, scale=scale), cast, dtype)
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            assert_close(ours[i], same[i], ref[name], FACTOR_OUTPUT if i == 0 else FACTOR_GRAD,
                         f"{dtype} {name}", floor=floors[name])
