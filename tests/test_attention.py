"""Flash-style attention: forward, LSE and every gradient against a high-precision reference (two oracles).

Oracles: ``gradkernels.testing.attention_reference`` (fp64, or extended precision for fp64 inputs) and
torch's composed path (``reference.standard_attention``) in the dtype under test; the floor of the rule
is the rounding-error bound ``testing.attention_bounds``. The SDPA drop-in is compared with torch's own
SDPA. On the CPU the kernels run under Triton's interpreter (shapes kept small); on a GPU the same tests
run, plus the bf16 and long-sequence cases marked below. The SDPA drop-in is tested in test_sdpa.py, the
modules and autocast in test_attention_modules.py, large logits in test_attention_large_logits.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradkernels
from gradkernels import reference, testing
from gradkernels.kernels import attention_configs
from gradkernels.ops import attention as attention_ops
from utils import DEVICE, ON_GPU, assert_close, check_attention

FACTOR_OUT, FACTOR_GRAD = 2, 3
ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
       torch.float64: torch.float64}


def _qkv(b, hq, hkv, lq, lk, d, dv, dtype, layout="bhld"):
    """q, k, v with requires_grad; ``layout="blhd"``: (B, L, H, D) storage seen as (B, H, L, D)."""
    def make(h, length, dim):
        if layout == "blhd":
            return torch.randn(b, length, h, dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, length, dim, device=DEVICE, dtype=dtype)

    q, k, v = make(hq, lq, d), make(hkv, lk, d), make(hkv, lk, dv)
    return [t.requires_grad_(True) for t in (q, k, v)]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


KEYS = ("out", "lse", "dq", "dk", "dv")


def _oracles(q, k, v, grad_out, causal, scale, align="bottom_right"):
    """(ref, same, floor): each (out, lse, dq, dk, dv).

    ref: ``testing.attention_reference`` (fp64; extended precision for fp64 inputs, so torch's fp64 path
    has an error of its own). same: ``reference.standard_attention`` (composed torch ops, autograd) in
    q's dtype. floor: ``testing.attention_bounds``, the rounding-error bound of the kernels and the
    reference, which holds in any summation order.
    """
    r = testing.attention_reference(q, k, v, grad_out, causal=causal, align=align, scale=scale)
    f = testing.attention_bounds(q, k, v, grad_out, causal=causal, align=align, scale=scale)
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.standard_attention(qq, kk, vv, causal, scale, return_lse=True, align=align)
    same = (out, lse.detach(), *_grads(out, (qq, kk, vv), grad_out))
    return tuple(r[key] for key in KEYS), same, tuple(f[key] for key in KEYS)




def _run_and_check(q, k, v, causal, top_left=False):
    """Forward and backward through ``gradkernels.autograd.attention`` with an explicit causal offset
    (bottom-right, or top-left), checked against the two oracles; returns ``(out, lse)``."""
    b, hq, lq, lk, d, dv = q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    grad_out = torch.randn(b, hq, lq, dv, device=DEVICE, dtype=q.dtype)
    offset = None if not causal else (0 if top_left else lk - lq)
    scale = 1 / math.sqrt(d)
    out, lse = gradkernels.autograd.attention(q, k, v, offset, scale)
    ours = (out, lse, *_grads(out, (q, k, v), grad_out))
    align = "top_left" if top_left else "bottom_right"
    check_attention(ours, _oracles(q, k, v, grad_out, causal, scale, align=align), ACC[q.dtype])
    return out, lse


# (B, Hq, Hkv, Lq, Lk, D, Dv, causal, dtype): every listed length pair, head dim and mode appears at
# least once; kept small because the CPU runs them under the interpreter.
CASES = [
    (1, 2, 2, 1, 1, 16, 16, False, torch.float32),
    (1, 2, 2, 1, 239, 64, 64, True, torch.float32),  # decoding: one query sees every key
    (2, 2, 2, 37, 53, 40, 40, False, torch.float32),
    (1, 2, 2, 37, 53, 80, 80, True, torch.float16),
    (1, 1, 1, 113, 203, 64, 64, True, torch.float32),
    (1, 1, 1, 128, 128, 128, 128, True, torch.float32),
    (1, 1, 1, 257, 129, 16, 16, False, torch.float32),
    (1, 1, 1, 257, 129, 16, 16, True, torch.float64),  # 128 rows see no key
    (1, 2, 2, 97, 97, 40, 24, True, torch.float32),  # Dv != D
    (1, 1, 1, 53, 37, 64, 96, False, torch.float16),  # Dv > D
    (1, 8, 2, 37, 53, 64, 64, True, torch.float32),  # GQA 4:1
    (1, 4, 1, 53, 37, 40, 40, True, torch.float16),  # MQA, empty rows
    (1, 4, 1, 97, 113, 80, 80, False, torch.float64),  # MQA
    (1, 1, 1, 37, 53, 100, 100, False, torch.float32),
    (1, 1, 1, 37, 41, 256, 256, True, torch.float32),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv,causal,dtype", CASES)
def test_attention_matches_reference(b, hq, hkv, lq, lk, d, dv, causal, dtype):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv, dtype)
    grad_out = torch.randn(b, hq, lq, dv, device=DEVICE, dtype=dtype)
    out, lse = gradkernels.attention(q, k, v, causal=causal, return_lse=True)
    ours = (out, lse, *_grads(out, (q, k, v), grad_out))
    # Lk = 1 included: P = 1, so dS and with it dQ, dK cancel to 0 in torch's path while ours keeps
    # rounding-sized values; the floor bounds those (the P error times |dP - Delta| term).
    check_attention(ours, _oracles(q, k, v, grad_out, causal, 1 / math.sqrt(d)), ACC[dtype])


@settings(max_examples=25, deadline=None)
@given(lq=st.integers(1, 80), lk=st.integers(1, 80), d=st.integers(1, 72), dv=st.integers(1, 72),
       group=st.sampled_from([1, 2, 3]), causal=st.booleans(), top_left=st.booleans())
def test_fuzz_lengths_head_dims_and_masks(lq, lk, d, dv, group, causal, top_left):
    """Random lengths around the 32-row interpreter tiles, head dims from 1, both causal alignments:
    exercises every branch of the block-range arithmetic (full, straddling, skipped, padded blocks)."""
    _run_and_check(*_qkv(1, group, 1, lq, lk, d, dv, torch.float64), causal, top_left)


def test_strided_inputs_are_read_in_place(monkeypatch):
    """(B, L, H, D) projections seen as (B, H, L, D), K and V slices of one packed tensor, a strided
    grad_out: correct results, and the kernels get the caller's tensors (no contiguous copies)."""
    b, h, lq, lk, d = 2, 2, 37, 53, 40
    q = torch.randn(b, lq, h, d, device=DEVICE).transpose(1, 2).requires_grad_(True)
    kv = torch.randn(b, lk, 2, h, d, device=DEVICE)
    k = kv[:, :, 0].transpose(1, 2).requires_grad_(True)
    v = kv[:, :, 1].transpose(1, 2).requires_grad_(True)
    grad_out = torch.randn(b, lq, h, d, device=DEVICE).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or grad_out.is_contiguous())

    seen = []
    launch = attention_ops._launch

    def spy(kernel, fn, grid, args, flags, pinned, tma_ok=False):
        seen.append((kernel, args))
        return launch(kernel, fn, grid, args, flags, pinned, tma_ok)

    monkeypatch.setattr(attention_ops, "_launch", spy)
    out = gradkernels.attention(q, k, v, causal=True)
    ours = (out, None, *_grads(out, (q, k, v), grad_out))
    assert [kind for kind, _ in seen] == ["fwd", "dkdv", "dq"]
    for _, args in seen:
        assert args[0].data_ptr() == q.data_ptr() and args[0].stride() == q.stride()
        assert args[1].data_ptr() == k.data_ptr() and args[1].stride() == k.stride()
        assert args[2].data_ptr() == v.data_ptr() and args[2].stride() == v.stride()
    assert seen[1][1][3].stride() == grad_out.stride()  # dO read in place too

    ref, same, floor = _oracles(q, k, v, grad_out, True, 1 / math.sqrt(d))
    assert_close(ours[0], same[0], ref[0], FACTOR_OUT, "out", floor=floor[0])
    for name, i in (("dq", 2), ("dk", 3), ("dv", 4)):
        assert_close(ours[i], same[i], ref[i], FACTOR_GRAD, name, floor=floor[i])


@pytest.mark.parametrize("lq,lk", [(53, 37), (37, 53)])
def test_top_left_alignment_through_the_launcher(lq, lk):
    """``causal_offset=0`` (torch's is_causal) against the reference's top-left mask, both Lq < Lk and
    Lq > Lk (no empty rows in this alignment)."""
    q, k, v = _qkv(1, 2, 1, lq, lk, 64, 64, torch.float32)
    grad_out = torch.randn(1, 2, lq, 64, device=DEVICE)
    scale = 0.3
    out, lse = gradkernels.autograd.attention(q, k, v, 0, scale)
    ours = (out, lse, *_grads(out, (q, k, v), grad_out))
    check_attention(ours, _oracles(q, k, v, grad_out, True, scale, align="top_left"), torch.float32)


def test_empty_rows_give_zero_output_minus_inf_lse_and_zero_gradients():
    lq, lk = 37, 11  # bottom-right: rows 0..25 see no key
    q, k, v = _qkv(1, 2, 1, lq, lk, 40, 40, torch.float32)
    grad_out = torch.randn(1, 2, lq, 40, device=DEVICE)
    out, lse = gradkernels.attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = _grads(out, (q, k, v), grad_out)
    empty = lq - lk
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all()
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    # The rows that do see keys are still right (the reference handles empty rows the same way).
    check_attention((out, lse, dq, dk, dv), _oracles(q, k, v, grad_out, True, 1 / math.sqrt(40)), torch.float32)


def test_lse_merges_partial_results_over_key_chunks():
    """Attention over keys [0, 60) and [60, 113) merged with their LSEs equals attention over all."""
    dtype = torch.float64
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 37, 113, 40, 40, dtype))
    chunks = [(k[:, :, :60], v[:, :, :60]), (k[:, :, 60:], v[:, :, 60:])]
    (o1, l1), (o2, l2) = (gradkernels.attention(q, kc, vc, return_lse=True) for kc, vc in chunks)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - lse), torch.exp(l2 - lse)
    merged = o1 * w1[..., None] + o2 * w2[..., None]
    ref = testing.attention_reference(q, k, v)
    same_out, same_lse = reference.standard_attention(q, k, v, return_lse=True)
    # Floor: each chunk's bound carried through the merge (d lse / d l_i = w_i), a few fp64 roundings of
    # the merge itself, and the full computation's bound (which holds the reference's error).
    f1, f2 = (testing.attention_bounds(q, kc, vc) for kc, vc in chunks)
    full = testing.attention_bounds(q, k, v)
    u = testing.unit_roundoff(dtype)
    e_lse = w1 * f1["lse"] + w2 * f2["lse"] + 4 * u * (lse.abs() + 1)
    e_w1 = w1 * (f1["lse"] + e_lse + 4 * u * ((l1 - lse).abs() + 1))
    e_w2 = w2 * (f2["lse"] + e_lse + 4 * u * ((l2 - lse).abs() + 1))
    e_out = (w1[..., None] * f1["out"] + w2[..., None] * f2["out"] + e_w1[..., None] * o1.abs()
             + e_w2[..., None] * o2.abs() + 2 * u * merged.abs())
    # fp64 end to end: an exact merge is within ~1e-14 (an fp32 LSE would be off by ~1e-7).
    assert_close(merged, same_out, ref["out"], FACTOR_OUT, "merged out", floor=e_out + full["out"])
    assert_close(lse, same_lse, ref["lse"], FACTOR_OUT, "merged lse", floor=e_lse + full["lse"])
    # Not a tautology: each chunk alone differs from the full result.
    assert (o1 - ref["out"]).abs().max() > 1e-3


def test_lse_is_not_differentiable_and_out_still_is():
    q, k, v = _qkv(1, 2, 2, 17, 23, 16, 16, torch.float32)
    out, lse = gradkernels.attention(q, k, v, return_lse=True)
    assert not lse.requires_grad and out.requires_grad
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("which", ["q", "kv", "v"])
def test_only_requested_gradients_are_computed(which, monkeypatch):
    q, k, v = _qkv(1, 4, 2, 37, 53, 40, 40, torch.float32)
    wanted = {"q": (q,), "kv": (k, v), "v": (v,)}[which]
    for t in (q, k, v):
        t.requires_grad_(any(t is w for w in wanted))
    launched = []
    launch = attention_ops._launch
    monkeypatch.setattr(attention_ops, "_launch",
                        lambda kernel, *a: (launched.append((kernel, a[3])), launch(kernel, *a))[1])
    grad_out = torch.randn(1, 4, 37, 40, device=DEVICE)
    out = gradkernels.attention(q, k, v, causal=True)
    grads = _grads(out, wanted, grad_out)
    kernels = [kind for kind, _ in launched]
    assert kernels == {"q": ["fwd", "dq"], "kv": ["fwd", "dkdv"], "v": ["fwd", "dkdv"]}[which]
    if which == "v":
        assert launched[1][1]["COMPUTE_DK"] is False and launched[1][1]["COMPUTE_DV"] is True
    ref, same, floor = _oracles(q, k, v, grad_out, True, 1 / math.sqrt(40))
    index = {"q": (2,), "kv": (3, 4), "v": (4,)}[which]
    for g, i in zip(grads, index):
        assert_close(g, same[i], ref[i], FACTOR_GRAD, KEYS[i], floor=floor[i])


def test_large_head_dim_splits_dkdv_into_two_launches(monkeypatch):
    """D > 128 computes dK and dV in two launches of the dK/dV kernel (one accumulator each, see
    kernels/attention_configs.py::wide_heads); both gradients still match the oracles (fp64, GQA, Dv != D)."""
    q, k, v = _qkv(1, 4, 2, 29, 37, 160, 136, torch.float64)
    launched = []
    launch = attention_ops._launch
    monkeypatch.setattr(attention_ops, "_launch",
                        lambda kernel, *a: (launched.append((kernel, a[3])), launch(kernel, *a))[1])
    grad_out = torch.randn(1, 4, 29, 136, device=DEVICE, dtype=torch.float64)
    out, lse = gradkernels.attention(q, k, v, causal=True, return_lse=True)
    ours = (out, lse, *_grads(out, (q, k, v), grad_out))
    dkdv = [(f["COMPUTE_DK"], f["COMPUTE_DV"]) for kind, f in launched if kind == "dkdv"]
    assert dkdv == [(True, False), (False, True)]
    assert not attention_configs.wide_heads(128, 128) and attention_configs.wide_heads(256, 256)
    assert attention_configs.wide_heads(64, 256)
    check_attention(ours, _oracles(q, k, v, grad_out, True, 1 / math.sqrt(160)), torch.float64)


def test_gradients_are_bitwise_deterministic():
    q, k, v = _qkv(2, 4, 1, 53, 61, 40, 40, torch.float32)
    grad_out = torch.randn(2, 4, 53, 40, device=DEVICE)
    first = _grads(gradkernels.attention(q, k, v, causal=True), (q, k, v), grad_out)
    second = _grads(gradkernels.attention(q, k, v, causal=True), (q, k, v), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal,lq,lk", [(False, 5, 7), (True, 5, 7), (True, 7, 5)])
def test_gradcheck_fp64_through_the_kernels(causal, lq, lk):
    q = torch.randn(1, 2, lq, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, lk, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, lk, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert gradkernels.backend_for(q) in ("triton", "interpreter")
    assert torch.autograd.gradcheck(lambda q, k, v: gradkernels.attention(q, k, v, causal=causal),
                                     (q, k, v), fast_mode=True)


def test_scale_is_applied_in_full_precision():
    """A scale that is not an fp32 number: fp64 results keep fp64 accuracy (the kernel takes it as fp64)."""
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 37, 53, 16, 16, torch.float64))
    scale = 1 / 3
    out, lse = gradkernels.attention(q, k, v, scale=scale, return_lse=True)
    ref = testing.attention_reference(q, k, v, scale=scale)
    floor = testing.attention_bounds(q, k, v, scale=scale)
    same_out, same_lse = reference.standard_attention(q, k, v, scale=scale, return_lse=True)
    assert_close(out, same_out, ref["out"], FACTOR_OUT, "out", floor=floor["out"])
    assert_close(lse, same_lse, ref["lse"], FACTOR_OUT, "lse", floor=floor["lse"])
    # 1/3 rounded to fp32 is off by 1e-8 relative: a result computed with it fails the same check.
    rounded = float(torch.tensor(scale, dtype=torch.float32))
    bad_out, bad_lse = reference.standard_attention(q, k, v, scale=rounded, return_lse=True)
    assert not testing.compare(bad_out, same_out, ref["out"], FACTOR_OUT, floor=floor["out"]).ok
    assert not testing.compare(bad_lse, same_lse, ref["lse"], FACTOR_OUT, floor=floor["lse"]).ok


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device, dtype=dtype)


BAD = [
    (lambda: (_t(2, 8, 16), _t(2, 1, 8, 16), _t(2, 1, 8, 16)), {}, ValueError, "q must be 4-D"),
    (lambda: (_t(2, 1, 8, 16), _t(3, 1, 8, 16), _t(3, 1, 8, 16)), {}, ValueError, "batch size"),
    (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 24), _t(1, 2, 8, 16)), {}, ValueError, "k must have the head dim"),
    (lambda: (_t(1, 3, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {}, ValueError, "multiple of k"),
    (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16)), {}, ValueError, "v must have as many positions"),
    (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 1, 8, 16)), {}, ValueError, "v must have as many heads"),
    (lambda: (_t(1, 1, 8, 300), _t(1, 1, 8, 300), _t(1, 1, 8, 16)), {}, ValueError, "q's head dim"),
    (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 257)), {}, ValueError, "v's head dim"),
    (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16, dtype=torch.float64), _t(1, 1, 8, 16)), {}, TypeError,
     "k has dtype"),
    (lambda: (torch.ones(1, 1, 8, 16, dtype=torch.int32), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), {}, TypeError,
     "q must be a floating-point"),
    (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16, device="meta"), _t(1, 1, 8, 16)), {}, ValueError, "k is on meta"),
    (lambda: ([[1.0]], _t(1, 1, 8, 16), _t(1, 1, 8, 16)), {}, TypeError, "q must be a torch.Tensor"),
    (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), {"scale": "0.5"}, TypeError, "scale"),
    (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), {"scale": float("nan")}, ValueError, "scale"),
    (lambda: (_t(1, 1, 8, 16), _t(1, 1, 8, 16), _t(1, 1, 8, 16)), {"causal": 1}, TypeError, "causal"),
]


@pytest.mark.parametrize("make,kwargs,exc,match", BAD)
def test_bad_input_is_rejected_before_any_launch(make, kwargs, exc, match, monkeypatch):
    def no_launch(*args, **kw):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(attention_ops, "_launch", no_launch)
    q, k, v = make()
    with pytest.raises(exc, match=match):
        gradkernels.attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------------------------------
# CUDA only: bf16 (the interpreter cannot do bf16 arithmetic) and long sequences
# ----------------------------------------------------------------------------------------------------

GPU_CASES = [
    (2, 8, 2, 1024, 1024, 64, 64, True, torch.bfloat16),
    (1, 8, 8, 2048, 2048, 128, 128, True, torch.bfloat16),
    (1, 4, 1, 1000, 3001, 128, 128, True, torch.bfloat16),
    (1, 4, 4, 3001, 1000, 80, 80, True, torch.float16),  # empty rows at length
    (2, 4, 4, 1024, 777, 96, 64, False, torch.bfloat16),
    (1, 4, 2, 1537, 1537, 256, 256, True, torch.bfloat16),
    (1, 4, 4, 1024, 1024, 64, 64, True, torch.float32),
    (1, 2, 1, 513, 700, 40, 40, True, torch.float64),
]


@pytest.mark.skipif(not ON_GPU, reason="bf16 and long sequences run on CUDA only "
                    "(the interpreter is CPU-slow and has no bf16)")
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv,causal,dtype", GPU_CASES)
def test_attention_long_and_bf16_on_gpu(b, hq, hkv, lq, lk, d, dv, causal, dtype):
    test_attention_matches_reference(b, hq, hkv, lq, lk, d, dv, causal, dtype)
