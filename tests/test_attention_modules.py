"""Attention modules and autocast: ``gradkernels.nn.MultiHeadAttention`` against composed torch, bad sizes,
and ``gradkernels.attention`` / the SDPA drop-in under ``torch.autocast``."""

import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels import reference
from utils import DEVICE, FACTOR_GRAD, FACTOR_OUTPUT, assert_close

FACTOR_OUT = FACTOR_OUTPUT


@pytest.mark.parametrize("num_kv_heads,causal", [(None, False), (1, True)])
def test_multi_head_attention_matches_composed_torch(num_kv_heads, causal):
    embed, heads, b, length = 64, 4, 2, 37
    mha = gradkernels.nn.MultiHeadAttention(embed, heads, num_kv_heads=num_kv_heads, causal=causal,
                                            device=DEVICE)
    x = torch.randn(b, length, embed, device=DEVICE, requires_grad=True)
    grad = torch.randn(b, length, embed, device=DEVICE)
    params = [x] + [p for p in mha.parameters()]
    out = mha(x)
    ours = (out, *torch.autograd.grad(out, params, grad))

    def composed(dtype):
        xx = x.detach().to(dtype).requires_grad_(True)
        ps = {n: p.detach().to(dtype).requires_grad_(True) for n, p in mha.named_parameters()}
        hd, hkv = embed // heads, num_kv_heads or heads

        def proj(name, h):
            y = F.linear(xx, ps[f"{name}.weight"], ps[f"{name}.bias"])
            return y.view(b, length, h, hd).transpose(1, 2)

        att = reference.naive_attention(proj("q_proj", heads), proj("k_proj", hkv), proj("v_proj", hkv), causal)
        o = F.linear(att.transpose(1, 2).reshape(b, length, embed), ps["out_proj.weight"], ps["out_proj.bias"])
        return (o, *torch.autograd.grad(o, [xx] + [ps[n] for n, _ in mha.named_parameters()], grad.to(dtype)))

    ref, same = composed(torch.float64), composed(torch.float32)
    names = ["out", "dx"] + [n for n, _ in mha.named_parameters()]
    for i, name in enumerate(names):
        assert_close(ours[i], same[i], ref[i], FACTOR_OUT if i == 0 else FACTOR_GRAD, name)


def test_multi_head_attention_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        gradkernels.nn.MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        gradkernels.nn.MultiHeadAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="embed_dim=32"):
        gradkernels.nn.MultiHeadAttention(32, 4)(torch.randn(2, 5, 16, device=DEVICE))


def test_attention_follows_autocast():
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(3))
    dtype = torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype):
        out = gradkernels.attention(q, k, v)
        ours_sdpa = gradkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
        theirs_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == dtype and ours_sdpa.dtype == theirs_sdpa.dtype == dtype
    ref = reference.standard_attention(q.double(), k.double(), v.double())
    same = reference.standard_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert_close(out, same, ref, FACTOR_OUT)


@pytest.mark.parametrize("training", [True, False])
def test_multi_head_attention_window_softcap_and_dropout(training):
    """window_size, softcap and dropout (training mode only) against composed torch with the same mask."""
    from gradkernels import testing

    embed, heads, hkv, b, length, p = 48, 4, 2, 2, 23, 0.2
    mha = gradkernels.nn.MultiHeadAttention(embed, heads, num_kv_heads=hkv, causal=True, window_size=(5, -1),
                                            softcap=2.5, dropout=p, device=DEVICE)
    mha.train(training)
    x = torch.randn(b, length, embed, device=DEVICE, requires_grad=True)
    grad = torch.randn(b, length, embed, device=DEVICE)
    torch.manual_seed(21)
    rng = gradkernels.dropout.new_rng_state(DEVICE)
    mask = gradkernels.dropout_mask(b, heads, length, length, p, rng[0], rng[1], device=DEVICE) if training else None
    torch.manual_seed(21)
    out = mha(x)
    ours = (out, *torch.autograd.grad(out, [x, mha.q_proj.weight], grad))

    def composed(dtype):
        xx = x.detach().to(dtype).requires_grad_(True)
        ps = {n: t.detach().to(dtype).requires_grad_(True) for n, t in mha.named_parameters()}
        hd = embed // heads

        def proj(name, h):
            return F.linear(xx, ps[f"{name}.weight"], ps[f"{name}.bias"]).view(b, length, h, hd).transpose(1, 2)

        att, _ = testing.torch_attention(proj("q_proj", heads), proj("k_proj", hkv), proj("v_proj", hkv),
                                         causal=True, window_size=(5, -1), softcap=2.5,
                                         dropout_p=p if training else 0.0, dropout_mask=mask)
        o = F.linear(att.transpose(1, 2).reshape(b, length, embed), ps["out_proj.weight"], ps["out_proj.bias"])
        return (o, *torch.autograd.grad(o, [xx, ps["q_proj.weight"]], grad.to(dtype)))

    ref, same = composed(torch.float64), composed(torch.float32)
    for i, name in enumerate(("out", "dx", "d q_proj.weight")):
        assert_close(ours[i], same[i], ref[i], FACTOR_OUT if i == 0 else FACTOR_GRAD, name)
    assert "softcap=2.5" in repr(mha) and "dropout=0.2" in repr(mha)


def test_multi_head_attention_rejects_bad_features():
    with pytest.raises(ValueError, match="dropout must be in"):
        gradkernels.nn.MultiHeadAttention(32, 4, dropout=1.5)
    with pytest.raises(TypeError, match="window_size"):
        gradkernels.nn.MultiHeadAttention(32, 4, window_size=4)
