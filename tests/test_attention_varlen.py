"""``gradkernels.attention_varlen``: packed variable-length batches against a per-sequence high-precision
reference (two oracles), with every feature, GQA, sequences of length 0 and 1; gradcheck in fp64; the
argument checks.

Oracles: ``testing.attention_reference_varlen`` (the dense reference of each sequence, bottom-right per
sequence) and ``testing.torch_attention_varlen`` (composed torch ops in the dtype under test), floors from
``testing.attention_bounds_varlen``. Dropout: the keep-masks of the call's seed by
``gradkernels.dropout_mask_varlen``.
"""

import pytest
import torch

import gradkernels
from gradkernels import testing
from utils import DEVICE, assert_close

FACTOR_OUT, FACTOR_GRAD = 2, 3
ACC = {torch.float16: torch.float32, torch.float32: torch.float32, torch.float64: torch.float64}
SEED = 4321


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)


def _packed(lq, lk, hq, hkv, d, dv, dtype, packed_qkv=False):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D/Dv) with requires_grad; ``packed_qkv``: k and v are
    strided slices of one (total, 2, Hkv, D) tensor."""
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, hq, d, device=DEVICE, dtype=dtype)
    if packed_qkv:
        kv = torch.randn(tk, 2, hkv, d, device=DEVICE, dtype=dtype)
        k, v = kv[:, 0], kv[:, 1]
    else:
        k = torch.randn(tk, hkv, d, device=DEVICE, dtype=dtype)
        v = torch.randn(tk, hkv, dv, device=DEVICE, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v)] if not packed_qkv else (
        q.requires_grad_(True), k.detach().requires_grad_(True), v.detach().requires_grad_(True))


def _slopes(kind, batch, hq):
    if kind is None:
        return None
    return (torch.rand((hq,) if kind == "head" else (batch, hq), device=DEVICE) * 0.5 + 0.05).float()


def _run(q, k, v, cu_q, cu_k, grad_out, **kw):
    p = kw.get("dropout_p", 0.0)
    torch.manual_seed(SEED)
    rng = gradkernels.dropout.new_rng_state(q.device) if p > 0 else None
    torch.manual_seed(SEED)
    mq = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    mk = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    out, lse = gradkernels.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    masks = None if p == 0 else gradkernels.dropout_mask_varlen(cu_q, cu_k, q.shape[1], p, rng[0], rng[1])
    return (out, lse, *grads), masks


def _check(ours, q, k, v, cu_q, cu_k, grad_out, masks, acc, **kw):
    extra = dict(kw)
    if masks is not None:
        extra["dropout_masks"] = masks
    ref = testing.attention_reference_varlen(q, k, v, cu_q, cu_k, grad_out, **extra)
    floor = testing.attention_bounds_varlen(q, k, v, cu_q, cu_k, grad_out, **extra)
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    s_out, s_lse = testing.torch_attention_varlen(qq, kk, vv, cu_q, cu_k, **extra)
    same = dict(out=s_out, lse=s_lse.detach(), **dict(zip(("dq", "dk", "dv"),
                                                          torch.autograd.grad(s_out, (qq, kk, vv), grad_out))))
    out, lse, dq, dk, dv = ours
    assert out.shape == (q.shape[0], q.shape[1], v.shape[-1]) and lse.shape == (q.shape[1], q.shape[0])
    assert lse.dtype == acc
    assert_close(out, same["out"], ref["out"], FACTOR_OUT, "out", floor=floor["out"])
    finite = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the reference"
    assert_close(lse[finite], same["lse"][finite].to(acc), ref["lse"][finite], FACTOR_OUT, "lse",
                 floor=floor["lse"][finite])
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert_close(g, same[name], ref[name], FACTOR_GRAD, name, floor=floor[name])


# (query lengths, key lengths, Hq, Hkv, D, Dv, dtype, features): lengths 0 and 1 and odd ones, Lq != Lk
# per sequence both ways (empty rows), GQA/MQA.
CASES = [
    ([37, 1, 53], [37, 1, 53], 4, 2, 40, 40, torch.float32, dict(causal=True)),
    ([5, 0, 19, 1], [7, 3, 13, 0], 2, 1, 16, 24, torch.float64, dict()),
    ([37, 13], [29, 41], 2, 2, 80, 80, torch.float16, dict(causal=True, softcap=2.0)),
    ([1, 41, 37], [53, 41, 37], 4, 1, 40, 40, torch.float32, dict(causal=True, window_size=(9, -1))),
    ([23, 31], [23, 31], 2, 2, 16, 16, torch.float32, dict(window_size=(4, 6), alibi_slopes="batch")),
    ([37, 0, 17], [37, 5, 17], 4, 2, 16, 16, torch.float64, dict(causal=True, dropout_p=0.3)),
    ([53, 7, 37], [53, 11, 29], 6, 2, 40, 40, torch.float32,
     dict(causal=True, window_size=(13, -1), softcap=1.5, alibi_slopes="head", dropout_p=0.2)),
]


@pytest.mark.parametrize("lq,lk,hq,hkv,d,dv,dtype,feats", CASES)
def test_varlen_matches_reference(lq, lk, hq, hkv, d, dv, dtype, feats):
    feats = dict(feats)
    feats["alibi_slopes"] = _slopes(feats.get("alibi_slopes"), len(lq), hq)
    q, k, v = _packed(lq, lk, hq, hkv, d, dv, dtype, packed_qkv=(d == dv == 40))
    cu_q, cu_k = _cu(lq), _cu(lk)
    grad_out = torch.randn(q.shape[0], hq, dv, device=DEVICE, dtype=dtype)
    ours, masks = _run(q, k, v, cu_q, cu_k, grad_out, **feats)
    _check(ours, q, k, v, cu_q, cu_k, grad_out, masks, ACC[dtype], **feats)


def test_sequences_do_not_see_each_other():
    """Changing one sequence's keys and values changes no other sequence's output or gradients."""
    lq = lk = [13, 17, 11]
    q, k, v = _packed(lq, lk, 2, 2, 16, 16, torch.float64)
    cu = _cu(lq)
    out = gradkernels.attention_varlen(q, k, v, cu, cu, 17, 17)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[13:30] += 1.0
    v2[13:30] -= 2.0
    out2 = gradkernels.attention_varlen(q, k2, v2, cu, cu, 17, 17)
    assert torch.equal(out[:13], out2[:13]) and torch.equal(out[30:], out2[30:])
    assert not torch.equal(out[13:30], out2[13:30])


def test_a_sequence_without_keys_gives_zero_output_and_minus_inf_lse():
    q, k, v = _packed([3, 4], [0, 5], 2, 1, 8, 8, torch.float32)
    out, lse = gradkernels.attention_varlen(q, k, v, _cu([3, 4]), _cu([0, 5]), 4, 5, return_lse=True)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.all(lse[:, :3] == float("-inf"))
    out.sum().backward()
    assert torch.equal(q.grad[:3], torch.zeros_like(q.grad[:3]))


@pytest.mark.parametrize("feats", [dict(causal=True), dict(window_size=(2, 1), softcap=0.9),
                                   dict(causal=True, alibi_slopes="batch", dropout_p=0.3)])
def test_gradcheck_fp64(feats):
    feats = dict(feats)
    feats["alibi_slopes"] = _slopes(feats.get("alibi_slopes"), 3, 2)
    lq, lk = [3, 1, 4], [4, 2, 3]
    q, k, v = _packed(lq, lk, 2, 1, 4, 3, torch.float64)
    cu_q, cu_k = _cu(lq), _cu(lk)

    def f(q, k, v):
        torch.manual_seed(SEED)
        return gradkernels.attention_varlen(q, k, v, cu_q, cu_k, 4, 4, scale=0.7, **feats)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def _args():
    q = torch.randn(9, 2, 8, device=DEVICE)
    k = torch.randn(11, 2, 8, device=DEVICE)
    return q, k, k.clone(), _cu([4, 5]), _cu([6, 5])


def _with(i, value):
    args = list(_args()) + [5, 6]
    args[i] = value
    return args


BAD = [
    (_with(3, _cu([4, 5]).long()), TypeError, "cu_seqlens_q must be int32"),
    (_with(4, torch.tensor([0, 6, 11], dtype=torch.float32, device=DEVICE)), TypeError, "cu_seqlens_k must be int32"),
    (_with(3, torch.tensor([1, 4, 9], dtype=torch.int32, device=DEVICE)), ValueError, "cu_seqlens_q must start at 0"),
    (_with(4, torch.tensor([0, 7, 6, 11], dtype=torch.int32, device=DEVICE)), ValueError,
     "same number of entries"),
    (_with(3, torch.tensor([0, 5, 4], dtype=torch.int32, device=DEVICE)), ValueError, "non-decreasing"),
    (_with(3, torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE)), ValueError,
     r"must end at the total number of tokens \(9\)"),
    (_with(5, 4), ValueError, "longer than max_seqlen_q = 4|has length 5, more than max_seqlen_q"),
    (_with(6, 5), ValueError, "more than max_seqlen_k = 5"),
    (_with(5, 5.0), TypeError, "max_seqlen_q must be an int"),
    (_with(3, torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)), ValueError, "cu_seqlens_q must be 1-D"),
    (_with(0, torch.randn(1, 9, 2, 8, device=DEVICE)), ValueError, "q must be 3-D"),
    (_with(1, torch.randn(11, 3, 8, device=DEVICE)), ValueError, "v must have k's tokens and heads"),
    (_with(0, torch.randn(9, 3, 8, device=DEVICE)), ValueError, "multiple"),
    (_with(2, torch.randn(10, 2, 8, device=DEVICE)), ValueError, "v must have k's tokens"),
    (_with(0, torch.randn(9, 2, 8, device=DEVICE).long()), TypeError, "q must be a floating-point"),
]


@pytest.mark.parametrize("args,error,match", BAD)
def test_bad_varlen_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        gradkernels.attention_varlen(*args)


def test_bad_alibi_shape_names_the_batch():
    q, k, v, cu_q, cu_k = _args()
    with pytest.raises(ValueError, match=r"\(batch, Hq\) = \(2, 2\)"):
        gradkernels.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, alibi_slopes=torch.ones(3, 2, device=DEVICE))
