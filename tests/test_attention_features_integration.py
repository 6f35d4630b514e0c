"""The features' custom ops and autograd route: opcheck, meta tensors, torch.func, double backward against
torch, the torch backend, and torch.compile(fullgraph=True) with dropout and varlen.
"""

import pytest
import torch

import gradkernels
from gradkernels import _device, custom_ops, testing
from utils import DEVICE, assert_close

F64 = torch.float64


def _rng():
    return torch.tensor([123456789, 3], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("feats", [(2, 1, 0.0, False, 0.0), (-1, 0, 1.5, True, 0.3)])
def test_opcheck_attention_features(feats):
    left, right, softcap, alibi, p = feats
    q = torch.randn(1, 23, 4, 16, device=DEVICE).transpose(1, 2)  # a transposed view, as the modules pass
    k = torch.randn(1, 2, 19, 16, device=DEVICE)
    v = torch.randn(1, 2, 19, 8, device=DEVICE)
    slopes = torch.rand(4, device=DEVICE) if alibi else None
    rng = _rng() if p > 0 else None
    args = (q, k, v, 19 - 23, 0.3, left, right, softcap, slopes, p, rng)
    torch.library.opcheck(custom_ops.attention_features_fwd, args)
    out, lse, lse_lo = custom_ops.attention_features_fwd(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(custom_ops.attention_features_bwd,
                          (grad, q, k, v, out, lse, lse_lo, *args[3:], True, False, True))


def test_opcheck_attention_varlen():
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 3, 9, 16], dtype=torch.int32, device=DEVICE)
    q = torch.randn(12, 4, 16, device=DEVICE, dtype=F64)
    k = torch.randn(16, 2, 16, device=DEVICE, dtype=F64)
    v = torch.randn(16, 2, 8, device=DEVICE, dtype=F64)
    args = (q, k, v, cu_q, cu_k, 7, 7, 0.25, 4, 0, 2.0, torch.rand(3, 4, device=DEVICE), 0.2, _rng())
    torch.library.opcheck(custom_ops.attention_varlen_fwd, args)
    out, lse, lse_lo = custom_ops.attention_varlen_fwd(*args)
    torch.library.opcheck(custom_ops.attention_varlen_bwd,
                          (torch.randn_like(out), q, k, v, out, lse, lse_lo, *args[3:], True, True, True))


def test_meta_tensors_give_the_shapes_of_a_real_run():
    q, k, v = (torch.empty(2, 4, 7, 40, device="meta"), torch.empty(2, 2, 9, 40, device="meta"),
               torch.empty(2, 2, 9, 24, device="meta"))
    out, lse = gradkernels.attention(q, k, v, causal=True, window_size=(3, -1), softcap=1.0, dropout_p=0.1,
                                     return_lse=True)
    assert out.shape == (2, 4, 7, 24) and lse.shape == (2, 4, 7) and out.device.type == "meta"
    cu = torch.empty(4, dtype=torch.int32, device="meta")  # values unknown: only dtype and shape are checked
    out, lse = gradkernels.attention_varlen(torch.empty(10, 4, 40, device="meta"), torch.empty(12, 2, 40, device="meta"),
                                            torch.empty(12, 2, 24, device="meta"), cu, cu.clone(), 5, 6,
                                            dropout_p=0.2, return_lse=True)
    assert out.shape == (10, 4, 24) and lse.shape == (4, 10)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_double_backward_matches_torch_in_fp64(backend):
    """Second derivatives (gradient of a gradient norm) against torch's autograd of composed ops, on each
    backend, with every feature at once (dropout through the same seed)."""
    q, k, v = (torch.randn(1, 2, 6, 5, device=DEVICE, dtype=F64, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2, device=DEVICE)
    kw = dict(causal=True, window_size=(3, -1), softcap=1.3, alibi_slopes=slopes, dropout_p=0.25)
    torch.manual_seed(8)
    rng = gradkernels.dropout.new_rng_state(DEVICE)
    mask = gradkernels.dropout_mask(1, 2, 6, 6, 0.25, rng[0], rng[1], device=DEVICE)

    def second(fn):
        out = fn(q, k, v)
        g = torch.autograd.grad((out * out).sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(sum((x * x).sum() for x in g), (q, k, v))

    def ours(q, k, v):
        torch.manual_seed(8)
        return gradkernels.attention(q, k, v, **kw)

    with _device.force_torch_backend() if backend == "torch" else torch.enable_grad():
        got = second(ours)
    want = second(lambda q, k, v: testing.torch_attention(q, k, v, dropout_mask=mask, **kw)[0])
    for name, a, b in zip(("q", "k", "v"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d2/d{name}")


def test_torch_func_grad_and_vmap():
    q, k, v = (torch.randn(3, 1, 2, 5, 8, device=DEVICE, dtype=F64) for _ in range(3))

    def loss(q, k, v):
        return gradkernels.attention(q, k, v, window_size=(1, 1), softcap=2.0).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(q, k, v)
    for i in range(3):
        want = torch.func.grad(lambda q: testing.torch_attention(q, k[i], v[i], window_size=(1, 1),
                                                                 softcap=2.0)[0].square().sum())(q[i])
        torch.testing.assert_close(per_sample[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_every_backend_gives_the_same_varlen_result(backend):
    """The torch backend and the kernel backend run the same op: results within the rule of each other's
    reference (the torch backend is the twin; the kernel backend is the launcher once F1 routes to it)."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(12, 2, 16, device=DEVICE) for _ in range(3))
    with _device.force_torch_backend() if backend == "torch" else torch.no_grad():
        out = gradkernels.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True, softcap=3.0)
    ref = testing.attention_reference_varlen(q, k, v, cu, cu, causal=True, softcap=3.0)
    floor = testing.attention_bounds_varlen(q, k, v, cu, cu, causal=True, softcap=3.0)
    same, _ = testing.torch_attention_varlen(q, k, v, cu, cu, causal=True, softcap=3.0)
    assert_close(out, same, ref["out"], 2, "out", floor=floor["out"])


def test_compile_fullgraph_features_dropout_and_varlen():
    """One compiled function with a windowed, soft-capped, dropped-out dense call and a causal varlen call
    with dropout: no graph break; with Inductor's fallback_random the seeds are eager's, so forward and
    gradients equal eager's."""
    config = torch._inductor.config
    before = config.fallback_random
    config.fallback_random = True
    try:
        cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)

        def f(q, k, v, qv, kv, vv):
            a = gradkernels.attention(q, k, v, causal=True, window_size=(3, -1), softcap=2.0, dropout_p=0.2)
            b = gradkernels.attention_varlen(qv, kv, vv, cu, cu, 6, 6, causal=True, dropout_p=0.1)
            return (a * a).sum() + (b * b).sum()

        inputs = [torch.randn(1, 2, 7, 8, device=DEVICE, requires_grad=True) for _ in range(3)]
        inputs += [torch.randn(10, 2, 8, device=DEVICE, requires_grad=True) for _ in range(3)]
        torch.manual_seed(0)
        compiled = torch.compile(f, fullgraph=True)(*inputs)
        g_compiled = torch.autograd.grad(compiled, inputs)
        torch.manual_seed(0)
        eager = f(*inputs)
        g_eager = torch.autograd.grad(eager, inputs)
        torch.testing.assert_close(compiled, eager)
        for a, b in zip(g_compiled, g_eager):
            torch.testing.assert_close(a, b)
    finally:
        config.fallback_random = before
        torch._dynamo.reset()
