"""The one autograd route on every backend: double backward, torch.func, forward-mode errors, and which
backward runs (the fused one unless a graph of the backward is needed, eager and compiled alike).

Backends, in one process: ``"kernels"`` (compiled Triton on CUDA, Triton's interpreter on the CPU, how
the suite runs) and ``"torch"`` (``gradkernels._device.force_torch_backend()``).

fp64 oracle. Every check here is in fp64 against torch's own ops in fp64. The allowed error is the fp64
rounding error of that computation, estimated from torch's own error in fp32 (same computation on the
inputs rounded to fp32, against fp64) scaled by eps64 / eps32: to first order, rounding error is
proportional to the unit roundoff, condition of the problem included. A factor of 16 on that (the
estimate is one sample of a rounding error, not a bound), plus 4 ulps of the largest reference value
for the rare case where fp32 happens to be exact. Observed: every error is at least 8x below its bound
on the development machine. Wrong second-order terms give errors of order one; an fp32-accurate path
would give ~1e-7 relative, 10^8 times the bound.
"""

import contextlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import gradkernels
from gradkernels import _device, reference
from gradkernels.ops import attention as attention_ops
from gradkernels.ops import linear as linear_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = list(reference.ACTIVATIONS)
BACKENDS = ["kernels", "torch"]
EPS64, EPS32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps


def _backend(name):
    return _device.force_torch_backend() if name == "torch" else contextlib.nullcontext()


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fp64_close(ours, ref64, ref32, name, factor=16):
    """``max|ours - ref64| <= factor * max|ref32 - ref64| * eps64/eps32 + 4 ulps of max|ref64|``."""
    assert ours.dtype == torch.float64 and ours.shape == ref64.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = _max_err(ours, ref64)
    rounding = _max_err(ref32, ref64) * EPS64 / EPS32
    bound = factor * rounding + 4 * EPS64 * ref64.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (fp64 rounding estimate {rounding:.1e})"


def _torch_linear(x, w, b, act):
    y = F.linear(x, w, b)
    return {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](y)


def _leaves(tensors, dtype, requires_grad):
    return [t.detach().to(dtype).requires_grad_(r) for t, r in zip(tensors, requires_grad)]


def _compare(run, inputs, requires_grad, names, backend):
    """``run(fn, *leaves) -> tuple of tensors`` with gradkernels' fn (fp64) against torch's (fp64, fp32)."""
    with _backend(backend):
        ours = run("ours", *_leaves(inputs, torch.float64, requires_grad))
    ref64 = run("torch", *_leaves(inputs, torch.float64, requires_grad))
    ref32 = run("torch", *_leaves(inputs, torch.float32, requires_grad))
    assert len(ours) == len(ref64) == len(names)
    for name, a, r64, r32 in zip(names, ours, ref64, ref32):
        assert_fp64_close(a, r64, r32, name)


# ----------------------------------------------------------------------------------------------------
# Double backward
# ----------------------------------------------------------------------------------------------------


def _linear_fn(which, act):
    if which == "ours":
        return lambda x, w, b: gradkernels.linear(x, w, b, act)
    return lambda x, w, b: _torch_linear(x, w, b, act)


def _gradient_penalty(f, x, w, b):
    """WGAN-GP: the input gradient, built with create_graph, enters the loss; then every gradient."""
    y = f(x, w, b)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum() + y.sum(), (x, w, b))


def _input_curvature(f, x, w, b):
    """Frozen layer (x alone requires grad): d/dx of |d(sum y^2)/dx|^2, through act''."""
    (gx,) = torch.autograd.grad(f(x, w, b).pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), x)


def _maml(f, x, w, b):
    """MAML: one inner SGD step on (w, b) kept in the graph, then the outer gradient."""
    gw, gb = torch.autograd.grad(f(x, w, b).tanh().sum(), (w, b), create_graph=True)
    return torch.autograd.grad(f(x, w - 0.3 * gw, b - 0.3 * gb).pow(2).sum(), (w, b))


SCENARIOS = {
    "gradient_penalty": (_gradient_penalty, (True, True, True), ("dx", "dw", "db")),
    "input_curvature": (_input_curvature, (True, False, False), ("dx",)),
    "maml": (_maml, (False, True, True), ("dw", "db")),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_double_backward_matches_torch_in_fp64(backend, act, scenario):
    fn, requires_grad, names = SCENARIOS[scenario]
    torch.manual_seed(1)
    inputs = (torch.randn(2, 5, 7, device=DEVICE), torch.randn(6, 7, device=DEVICE) / 7**0.5,
              torch.randn(6, device=DEVICE))
    _compare(lambda which, *leaves: fn(_linear_fn(which, act), *leaves), inputs, requires_grad, names, backend)


def _torch_attention(q, k, v, causal_offset, scale):
    """softmax(q k^T * scale + mask) v in plain torch ops; rows that see no key give 0 (no NaN)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-2, -1)) * scale
    if causal_offset is None:
        return torch.softmax(s, -1) @ v
    i = torch.arange(q.shape[2], device=q.device)[:, None]
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= i + causal_offset
    has_key = visible.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0), -1) * has_key
    return p @ v


# (Lq, Lk, causal): no mask; bottom-right with Lq > Lk (the first rows see no key).
ATTENTION_CASES = {"no_mask": (5, 7, False), "causal_empty_rows": (9, 4, True)}


def _attention_fn(which, lq, lk, causal):
    offset = lk - lq if causal else None
    if which == "ours":
        return lambda q, k, v: gradkernels.attention(q, k, v, causal=causal, scale=0.4)
    return lambda q, k, v: _torch_attention(q, k, v, offset, 0.4)


def _qkv(lq, lk):
    torch.manual_seed(2)  # GQA: two query heads on one kv head; Dv != D
    return (torch.randn(1, 2, lq, 8, device=DEVICE), torch.randn(1, 1, lk, 8, device=DEVICE),
            torch.randn(1, 1, lk, 4, device=DEVICE))


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_double_backward_matches_torch_in_fp64(backend, case):
    lq, lk, causal = ATTENTION_CASES[case]

    def run(which, q, k, v):
        f = _attention_fn(which, lq, lk, causal)
        out = f(q, k, v)
        (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(gq.pow(2).sum() + out.sum(), (q, k, v))

    _compare(run, _qkv(lq, lk), (True, True, True), ("dq", "dk", "dv"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_drop_in_double_backward_matches_torch_in_fp64(backend):
    """torch's top-left is_causal through the drop-in (the kernels on the kernel backend)."""
    def run(which, q, k, v):
        sdpa = gradkernels.scaled_dot_product_attention if which == "ours" else F.scaled_dot_product_attention
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        (gk,) = torch.autograd.grad(out.pow(2).sum(), k, create_graph=True)
        return torch.autograd.grad(gk.pow(2).sum(), (q, k, v))

    if backend == "kernels":
        assert gradkernels.backend_for(torch.empty(1, device=DEVICE, dtype=torch.float64)) != "torch"
    _compare(run, _qkv(6, 6), (True, True, True), ("dq", "dk", "dv"), backend)


# ----------------------------------------------------------------------------------------------------
# torch.func
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_vmap_fallback():
    """torch's slow per-example fallback warns; every op has its own batching rule, so none may appear."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        yield


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_torch_func_grad_vmap_and_hessian(backend, act, no_vmap_fallback):
    func = torch.func
    torch.manual_seed(3)
    inputs = (torch.randn(4, 3, 5, device=DEVICE), torch.randn(6, 5, device=DEVICE) / 5**0.5,
              torch.randn(6, device=DEVICE), torch.randn(4, 6, 5, device=DEVICE))

    def run(which, xs, w, b, ws):
        f = _linear_fn(which, act)

        def loss(w, x):
            return f(x, w, b).pow(2).sum()

        return (
            func.vmap(f, (0, None, None))(xs, w, b),        # batch of inputs: folded into the rows
            func.vmap(f, (None, 0, None))(xs[0], ws, b),    # batch of weights: one launch per weight
            func.grad(loss)(w, xs[0]),
            func.vmap(func.grad(loss), (None, 0))(w, xs),   # per-sample gradients
            func.jacrev(func.jacrev(lambda w: loss(w, xs[0])))(w),  # Hessian (reverse over reverse)
        )

    _compare(run, inputs, (False,) * 4, ("vmap x", "vmap w", "grad", "vmap(grad)", "hessian"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_torch_func_grad_vmap_and_hessian(backend, no_vmap_fallback):
    func = torch.func
    lq, lk, causal = ATTENTION_CASES["causal_empty_rows"]
    q, k, v = _qkv(lq, lk)
    inputs = (q.expand(3, *q.shape).clone(), k.expand(3, *k.shape) + 0.1 * torch.randn(3, *k.shape), v)

    def run(which, qs, ks, v):
        f = _attention_fn(which, lq, lk, causal)

        def loss(q, k):
            return f(q, k, v).pow(2).sum()

        return (
            func.vmap(f, (0, 0, None))(qs, ks, v),
            func.grad(loss, (0, 1))(qs[0], ks[0])[1],
            func.vmap(func.grad(loss))(qs, ks),
            func.jacrev(func.jacrev(lambda k: loss(qs[0], k)))(ks[0]),  # Hessian in k: 32 x 32
        )

    _compare(run, inputs, (False,) * 3, ("vmap", "grad", "vmap(grad)", "hessian"), backend)


@pytest.mark.parametrize("api", ["linear", "attention"])
def test_forward_mode_ad_raises_a_clear_error(api):
    q = torch.randn(1, 1, 3, 4, device=DEVICE, dtype=torch.float64)
    x, w = torch.randn(3, 4, device=DEVICE, dtype=torch.float64), torch.randn(2, 4, device=DEVICE,
                                                                             dtype=torch.float64)
    f = (lambda t: gradkernels.linear(t, w)) if api == "linear" else (lambda t: gradkernels.attention(t, q, q))
    primal = x if api == "linear" else q
    with pytest.raises(NotImplementedError, match=f"gradkernels.{api} does not support forward-mode AD"):
        torch.func.jvp(f, (primal,), (torch.ones_like(primal),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(fwAD.make_dual(primal, torch.ones_like(primal)))


# ----------------------------------------------------------------------------------------------------
# Which backward runs
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Counts launcher calls (the kernel backends' innermost step) by name."""
    counts = {}
    for module, names in ((linear_ops, ("linear_forward", "linear_backward")),
                          (attention_ops, ("attention_forward", "attention_backward"))):
        for name in names:
            original = getattr(module, name)

            def counting(*args, _name=name, _fn=original, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _fn(*args, **kwargs)

            monkeypatch.setattr(module, name, counting)
    return counts


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = gradkernels.nn.Linear(16, 48, activation="gelu")

    def forward(self, x):
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).unbind(2)
        return gradkernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_training_backward_is_the_fused_kernel_backward(mode, launches):
    """Plain backward, eager and under torch.compile(fullgraph=True): one fused backward launch per op
    and no recomputation; only create_graph=True takes the differentiable route (more launches)."""
    torch.manual_seed(4)
    block = _Block().to(DEVICE)
    x = torch.randn(2, 11, 16, device=DEVICE, requires_grad=True)
    run = torch.compile(block, fullgraph=True, backend="aot_eager") if mode == "compiled" else block
    run(x).sum().backward()
    assert launches == {"linear_forward": 1, "attention_forward": 1, "linear_backward": 1,
                        "attention_backward": 1}, launches
    if mode == "eager":
        launches.clear()
        (gx,) = torch.autograd.grad(block(x).sum(), x, create_graph=True)
        # dX = linear(dY', W^T) and dW = linear(dY'^T, X^T) with dY' = dY * act'(pre): two forward
        # launches of our linear instead of the fused backward (needs_input_grad asks for dW too).
        assert launches == {"linear_forward": 3, "attention_forward": 1, "attention_backward": 1}, launches
        assert gx.requires_grad
