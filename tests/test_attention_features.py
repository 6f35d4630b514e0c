"""Attention features of ``gradkernels.attention``: sliding windows, softcap, ALiBi and dropout, alone and
together, against a high-precision reference (two oracles), gradcheck in fp64, bad input.

Oracles: ``gradkernels.testing.attention_reference`` (fp64; extended precision for fp64 inputs) with the
features written out independently (the window from the issue's inequality, ALiBi's distances, tanh),
and ``gradkernels.testing.torch_attention`` (composed torch ops, independent of the torch twins in
``gradkernels.reference`` that run these calls today) in the dtype under test; the floor
is ``testing.attention_bounds`` with the features' terms. Dropout: both oracles use the keep-mask of the
call's seed, materialised by ``gradkernels.dropout_mask`` (the mask itself is tested in
test_dropout.py). These calls run wherever the routing hook
``ops.attention_features.features_supported_by_kernels`` sends them: the Triton kernels (the interpreter
on CPU), or the torch twin on the torch backend; test_attention_features_kernels.py checks the route.
"""

import math

import pytest
import torch

import gradkernels
from gradkernels import testing
from utils import DEVICE, assert_close, check_attention

FACTOR_OUT, FACTOR_GRAD = 2, 3
ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
       torch.float64: torch.float64}
KEYS = ("out", "lse", "dq", "dk", "dv")
SEED = 1234


def _qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout="bhld"):
    def make(h, length, dim):
        if layout == "blhd":
            return torch.randn(b, length, h, dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, length, dim, device=DEVICE, dtype=dtype)

    return [t.requires_grad_(True) for t in (make(hq, lq, d), make(hkv, lk, d), make(hkv, lk, dv))]


def _slopes(kind, b, hq):
    """ALiBi slopes: None, per head (Hq,), or per batch element and head (B, Hq); fp32, random positive."""
    if kind is None:
        return None
    shape = (hq,) if kind == "head" else (b, hq)
    return (torch.rand(shape, device=DEVICE) * 0.5 + 0.05).float()


def _run(q, k, v, grad_out, **kw):
    """``gradkernels.attention`` with ``return_lse``, its gradients, and the keep-mask its seed gives."""
    p = kw.get("dropout_p", 0.0)
    torch.manual_seed(SEED)
    rng = gradkernels.dropout.new_rng_state(q.device) if p > 0 else None
    torch.manual_seed(SEED)  # the call draws the same state
    out, lse = gradkernels.attention(q, k, v, return_lse=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = None
    if p > 0:
        b, hq, lq, _ = q.shape
        mask = gradkernels.dropout_mask(b, hq, lq, k.shape[2], p, rng[0], rng[1], device=q.device)
    return (out, lse, *grads), mask


def _oracles(q, k, v, grad_out, mask, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None, dropout_p=0.0):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    kw = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
              dropout_mask=mask)
    r = testing.attention_reference(q, k, v, grad_out, causal=causal, scale=scale, **kw)
    f = testing.attention_bounds(q, k, v, grad_out, causal=causal, scale=scale, **kw)
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = testing.torch_attention(qq, kk, vv, causal=causal, scale=scale, **kw)
    same = (out, lse.detach(), *torch.autograd.grad(out, (qq, kk, vv), grad_out))
    return tuple(r[key] for key in KEYS), same, tuple(f[key] for key in KEYS)




# (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, features): each feature alone, in pairs and all together; odd
# lengths, Lq != Lk both ways (empty rows), GQA/MQA, head dims 40/80, fp16/fp32/fp64.
CASES = [
    (1, 4, 2, 37, 53, 40, 40, torch.float32, dict(window_size=(5, 3))),
    (1, 2, 1, 53, 37, 16, 24, torch.float64, dict(causal=True, window_size=(7, -1))),  # empty rows
    (2, 2, 2, 37, 37, 16, 16, torch.float32, dict(window_size=(-1, 4))),  # right side only
    (1, 2, 2, 37, 41, 80, 80, torch.float16, dict(softcap=3.0)),
    (1, 2, 2, 37, 37, 16, 16, torch.float32, dict(causal=True, softcap=1.5, scale=1.0)),  # tanh saturates
    (1, 4, 2, 37, 53, 40, 40, torch.float32, dict(causal=True, alibi_slopes="head")),
    (2, 2, 1, 41, 37, 16, 16, torch.float64, dict(alibi_slopes="batch")),
    (1, 4, 4, 37, 53, 40, 40, torch.float32, dict(dropout_p=0.3)),
    (1, 2, 1, 53, 37, 40, 40, torch.float16, dict(causal=True, dropout_p=0.1)),
    (1, 4, 1, 37, 37, 16, 16, torch.float64, dict(dropout_p=0.5, softcap=2.0)),
    (1, 4, 2, 97, 113, 40, 40, torch.float32,
     dict(causal=True, window_size=(33, -1), softcap=2.5, alibi_slopes="head", dropout_p=0.2)),
    (1, 2, 2, 1, 113, 80, 80, torch.float32, dict(causal=True, window_size=(16, -1), dropout_p=0.1)),  # decode
    (2, 6, 2, 37, 37, 16, 16, torch.float64,
     dict(window_size=(3, 5), softcap=1.0, alibi_slopes="batch", dropout_p=0.25)),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv,dtype,feats", CASES)
def test_features_match_reference(b, hq, hkv, lq, lk, d, dv, dtype, feats):
    feats = dict(feats)
    feats["alibi_slopes"] = _slopes(feats.get("alibi_slopes"), b, hq)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout="blhd" if d == 40 else "bhld")
    grad_out = torch.randn(b, hq, lq, dv, device=DEVICE, dtype=dtype)
    ours, mask = _run(q, k, v, grad_out, **feats)
    check_attention(ours, _oracles(q, k, v, grad_out, mask, **feats), ACC[dtype])


def test_window_rows_that_see_no_key_give_zero_output_minus_inf_lse_and_zero_gradients():
    """Window (0, 0) with Lq > Lk: row i sees only key ``i + Lk - Lq``, so rows i < Lq - Lk see none."""
    lq, lk = 37, 19
    q, k, v = _qkv(1, 2, 1, lq, lk, 16, 16, torch.float32)
    grad_out = torch.randn(1, 2, lq, 16, device=DEVICE)
    ours, _ = _run(q, k, v, grad_out, window_size=(0, 0))
    out, lse, dq, dk, dv = ours
    empty = lq - lk
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.all(lse[:, :, :empty] == float("-inf")) and torch.isfinite(lse[:, :, empty:]).all()
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    check_attention(ours, _oracles(q, k, v, grad_out, None, window_size=(0, 0)), torch.float32)


def test_causal_overrides_the_window_right_side():
    """FlashAttention's rule: with causal=True the right side is 0 whatever is given."""
    q, k, v = _qkv(1, 2, 2, 37, 37, 16, 16, torch.float64)
    a = gradkernels.attention(q, k, v, causal=True, window_size=(5, 9))
    ref = testing.attention_reference(q, k, v, window_size=(5, 0))
    floor = testing.attention_bounds(q, k, v, window_size=(5, 0))["out"]
    same, _ = testing.torch_attention(q, k, v, window_size=(5, 0))
    assert_close(a, same, ref["out"], FACTOR_OUT, "out", floor=floor)


def test_plain_calls_keep_the_plain_route(monkeypatch):
    """No feature (or only causal, or a window of (-1, 0)): the plain custom op, not the features op."""
    from gradkernels import custom_ops

    called = []
    monkeypatch.setattr(custom_ops, "attention_features_fwd", lambda *a: called.append(a))
    q, k, v = _qkv(1, 2, 2, 7, 9, 16, 16, torch.float32)
    gradkernels.attention(q, k, v)
    gradkernels.attention(q, k, v, causal=True, window_size=(-1, 7))
    gradkernels.attention(q, k, v, window_size=(-1, 0), softcap=0.0, dropout_p=0.0)
    assert called == []


@pytest.mark.parametrize("feats", [
    dict(window_size=(2, 1)),
    dict(causal=True, window_size=(3, -1)),
    dict(softcap=0.7),
    dict(alibi_slopes="batch"),
    dict(dropout_p=0.4),
    dict(causal=True, window_size=(2, -1), softcap=1.3, alibi_slopes="head", dropout_p=0.3),
])
def test_gradcheck_fp64(feats):
    feats = dict(feats)
    feats["alibi_slopes"] = _slopes(feats.get("alibi_slopes"), 2, 4)
    q, k, v = _qkv(2, 4, 2, 6, 7, 5, 3, torch.float64)

    def f(q, k, v):
        torch.manual_seed(SEED)  # the same dropout mask at every evaluation
        return gradkernels.attention(q, k, v, scale=0.8, **feats)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_gradgradcheck_fp64_all_features():
    q, k, v = _qkv(1, 2, 1, 4, 5, 3, 3, torch.float64)
    slopes = _slopes("head", 1, 2)

    def f(q, k, v):
        torch.manual_seed(SEED)
        return gradkernels.attention(q, k, v, causal=True, window_size=(2, -1), softcap=1.1, alibi_slopes=slopes,
                                     dropout_p=0.3)

    assert torch.autograd.gradgradcheck(f, (q, k, v), fast_mode=True)


def test_alibi_slopes_get_no_gradient():
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, 8, torch.float32)
    slopes = torch.rand(2, device=DEVICE, requires_grad=True)
    out = gradkernels.attention(q, k, v, alibi_slopes=slopes)
    out.sum().backward()
    assert slopes.grad is None and q.grad is not None


BAD = [
    (dict(window_size=5), TypeError, "window_size"),
    (dict(window_size=(1, 2, 3)), TypeError, "window_size"),
    (dict(window_size=(1.0, 2)), TypeError, "window_size"),
    (dict(window_size=(-2, 3)), ValueError, "window_size left"),
    (dict(window_size=(3, -5)), ValueError, "window_size right"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="1"), TypeError, "softcap"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=True), TypeError, "dropout_p"),
    (dict(alibi_slopes=[0.1, 0.2]), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq,\)"),
    (dict(alibi_slopes=torch.ones(2, 2, 2)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(2, device="meta")), ValueError, "alibi_slopes is on meta"),
    (dict(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_feature_arguments_are_named(kwargs, error, match):
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE) for _ in range(3))
    with pytest.raises(error, match=match):
        gradkernels.attention(q, k, v, **kwargs)
