"""The ``torch.nn.functional.scaled_dot_product_attention`` drop-in: the calls it runs on the kernels
match torch's SDPA (two oracles, torch's conventions: top-left causal, 2-D to 5-D inputs, enable_gqa), and
every other call is handed to torch itself, with torch's results and errors."""

import logging

import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels import testing
from gradkernels.ops import attention as attention_ops
from utils import DEVICE, FACTOR_GRAD, FACTOR_OUTPUT, ON_GPU, assert_close

FACTOR_OUT = FACTOR_OUTPUT


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


SDPA_COVERED = [
    # query shape, key shape, value shape, kwargs
    ((2, 2, 37, 40), (2, 2, 53, 40), (2, 2, 53, 40), {}),
    ((1, 2, 53, 64), (1, 2, 37, 64), (1, 2, 37, 64), {"is_causal": True}),  # top-left, Lq > Lk
    ((1, 2, 37, 64), (1, 2, 53, 64), (1, 2, 53, 24), {"is_causal": True, "scale": 0.2}),
    ((1, 4, 37, 40), (1, 2, 53, 40), (1, 2, 53, 40), {"enable_gqa": True, "is_causal": True}),
    ((3, 37, 16), (3, 41, 16), (3, 41, 16), {}),  # 3-D: (N, L, E)
    ((2, 1, 2, 17, 16), (2, 1, 2, 23, 16), (2, 1, 2, 23, 16), {"is_causal": True}),  # 5-D
    ((17, 16), (23, 16), (23, 16), {}),  # 2-D
]


@pytest.mark.parametrize("qs,ks,vs,kwargs", SDPA_COVERED)
def test_sdpa_runs_kernels_and_matches_torch(qs, ks, vs, kwargs, monkeypatch, caplog):
    calls = []
    forward = attention_ops.attention_forward
    monkeypatch.setattr(attention_ops, "attention_forward",
                        lambda *a, **kw: (calls.append(a[3]), forward(*a, **kw))[1])
    q, k, v = (torch.randn(s, device=DEVICE).requires_grad_(True) for s in (qs, ks, vs))
    grad_out = torch.randn(*qs[:-1], vs[-1], device=DEVICE)
    with caplog.at_level(logging.DEBUG, logger="gradkernels"):
        out = gradkernels.scaled_dot_product_attention(q, k, v, **kwargs)
    assert calls == [0 if kwargs.get("is_causal") else None], "the kernels did not run (or ran twice)"
    assert not caplog.records
    ours = (out, *_grads(out, (q, k, v), grad_out))
    results = []
    for dtype in (torch.float64, torch.float32):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, **kwargs)
        results.append((o, *_grads(o, (qq, kk, vv), grad_out.to(dtype))))
    ref, same = results
    floor = _sdpa_floors(q, k, v, grad_out, kwargs)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close(ours[i], same[i], ref[i], FACTOR_OUT if i == 0 else FACTOR_GRAD, name, floor=floor[name])


def _sdpa_floors(q, k, v, grad_out, kwargs):
    """``testing.attention_bounds`` of an SDPA call: any leading dims (seen as (B, H)), torch's top-left
    causal mask; returned in the call's shapes."""
    def as_4d(t):
        return t.reshape(-1, *t.shape[-3:]) if t.dim() >= 3 else t.reshape(1, 1, *t.shape)

    f = testing.attention_bounds(as_4d(q), as_4d(k), as_4d(v), as_4d(grad_out), causal=kwargs.get("is_causal", False),
                                 align="top_left", scale=kwargs.get("scale"))
    shapes = {"out": grad_out.shape, "dq": q.shape, "dk": k.shape, "dv": v.shape}
    return {key: f[key].reshape(shape) for key, shape in shapes.items()}


# Dropout and boolean key-padding masks run on the kernels (test_dropout.py, test_sdpa_masks.py).
SDPA_HANDED_OVER = [
    ({"attn_mask": "bool"}, "not a key-padding mask"),
    ({"attn_mask": "float"}, "attn_mask is not a boolean tensor"),
    ({"kv_heads": 1}, "head counts"),  # broadcast heads without enable_gqa: torch's math path allows it
]


@pytest.mark.parametrize("kwargs,reason", SDPA_HANDED_OVER)
def test_sdpa_hands_other_calls_to_torch(kwargs, reason, monkeypatch, caplog):
    monkeypatch.setattr(attention_ops, "attention_forward",
                        lambda *a, **kw: pytest.fail("the kernels ran on a call they do not cover"))
    kwargs = dict(kwargs)
    hkv = kwargs.pop("kv_heads", 2)
    q, k, v = torch.randn(1, 2, 13, 16, device=DEVICE), torch.randn(1, hkv, 11, 16, device=DEVICE), \
        torch.randn(1, hkv, 11, 16, device=DEVICE)
    mask = kwargs.get("attn_mask")
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(13, 11, device=DEVICE) > 0.3
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(1, 2, 13, 11, device=DEVICE)
    torch.manual_seed(1)
    with caplog.at_level(logging.DEBUG, logger="gradkernels"):
        ours = gradkernels.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.manual_seed(1)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(ours, theirs)
    assert any(reason in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_sdpa_raises_what_torch_raises():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(type(theirs.value)):
        gradkernels.scaled_dot_product_attention(q, k, v)




@pytest.mark.skipif(not ON_GPU, reason="bf16 runs on CUDA only (the interpreter has no bf16)")
def test_sdpa_bf16_on_gpu():
    q, k, v = (torch.randn(2, 8, 1024, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    same = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    floor = testing.attention_bounds(q, k, v, causal=True, align="top_left")["out"]
    assert_close(gradkernels.scaled_dot_product_attention(q, k, v, is_causal=True), same, ref, FACTOR_OUT,
                 floor=floor)
