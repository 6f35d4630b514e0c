"""Special values and edge cases exactly like torch, on every backend: NaN and +-inf through every
activation forward and backward, in_features = 0, meta tensors and FakeTensors.

Backends, in one process: ``"kernels"`` (compiled Triton on CUDA, Triton's interpreter on the CPU) and
``"torch"`` (``gradkernels._device.force_torch_backend()``).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import gradkernels
from gradkernels import _device, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = list(reference.ACTIVATIONS)
BACKENDS = ["kernels", "torch"]
INF, NAN = float("inf"), float("nan")

# numpy under Triton's interpreter warns on inf - inf and inf * 0, which are the point here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _backend(name):
    return _device.force_torch_backend() if name == "torch" else contextlib.nullcontext()


def _gelu_inf(u):
    # gelu(+inf) = +inf, as torch computes it on CUDA, in fp64 and on its scalar CPU path. Its fp32 CPU
    # kernel returns NaN there on AVX512 machines (the vectorised erf) for tensors of 8 elements and more:
    # the kernels follow the CUDA value; the torch backend runs torch's own gelu, so it follows the CPU's.
    return torch.where(u == INF, u, F.gelu(u))


def _torch_act(t, act, backend="torch"):
    gelu = _gelu_inf if backend == "kernels" else F.gelu
    return {None: lambda u: u, "relu": F.relu, "gelu": gelu, "silu": F.silu,
            "gelu_tanh": lambda u: F.gelu(u, approximate="tanh")}[act](t)


def _run(fn, x, w, b, grad):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(grad)
    return y.detach(), x.grad, w.grad, b.grad


def _assert_same_special_values(ours, theirs, name):
    """NaN where torch has NaN, +inf / -inf where torch has them; finite values close."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
    for what, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == INF), ("-inf", lambda t: t == -INF)):
        assert torch.equal(mask(ours), mask(theirs)), (
            f"{name}: {what} at {mask(ours).nonzero().tolist()}, torch has it at {mask(theirs).nonzero().tolist()}"
        )
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], msg=lambda m: f"{name}: {m}")


def _special_inputs(dtype):
    """x with NaN, +inf and -inf entries; W a signed, scaled permutation, so each special value of x
    reaches exactly one pre-activation, with either sign (act and act' are seen elementwise, in dX too);
    finite rows in between."""
    torch.manual_seed(5)
    x = torch.randn(7, 6, device=DEVICE, dtype=dtype)
    x[0, 1], x[1, 2], x[2, 3], x[4, 0], x[4, 5] = NAN, INF, -INF, INF, -INF
    w = torch.zeros(6, 6, device=DEVICE, dtype=dtype)
    w[torch.arange(6), torch.randperm(6)] = (torch.rand(6, dtype=dtype) + 0.5).to(DEVICE)
    w[::2] *= -1
    b = torch.randn(6, device=DEVICE, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_torch_through_every_activation(backend, act, dtype):
    x, w, b = _special_inputs(dtype)
    grad = torch.randn(7, 6, device=DEVICE, dtype=dtype)
    with _backend(backend):
        ours = _run(lambda x, w, b: gradkernels.linear(x, w, b, act), x, w, b, grad)
    theirs = _run(lambda x, w, b: _torch_act(F.linear(x, w, b), act, backend), x, w, b, grad)
    for name, a, t in zip(("output", "dx", "dw", "db"), ours, theirs):
        _assert_same_special_values(a, t, f"{act} {name}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_through_a_dense_layer(backend, act):
    """A dense W mixes the special values into whole rows and columns (inf - inf = NaN and so on):
    torch's pattern, whatever the summation order."""
    torch.manual_seed(6)
    x = torch.randn(9, 13, device=DEVICE)
    x[1, 4], x[3, 0], x[6, 12] = NAN, INF, -INF
    w, b = torch.randn(5, 13, device=DEVICE), torch.randn(5, device=DEVICE)
    b[2] = INF
    grad = torch.randn(9, 5, device=DEVICE)
    with _backend(backend):
        ours = _run(lambda x, w, b: gradkernels.linear(x, w, b, act), x, w, b, grad)
    theirs = _run(lambda x, w, b: _torch_act(F.linear(x, w, b), act, backend), x, w, b, grad)
    for name, a, t in zip(("output", "dx", "dw", "db"), ours, theirs):
        _assert_same_special_values(a, t, f"{act} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_nan_and_passes_its_gradient(backend):
    """The report's case: relu(NaN) is NaN (not 0) and torch's relu backward passes the gradient there."""
    x = torch.tensor([[NAN], [1.5], [-2.0]], device=DEVICE, requires_grad=True)
    one = torch.ones(1, 1, device=DEVICE)
    with _backend(backend):
        y = gradkernels.linear(x, one, None, "relu")
        y.backward(torch.full_like(y, 0.25))
    assert torch.isnan(y[0, 0]) and y[1, 0] == 1.5 and y[2, 0] == 0
    assert x.grad.tolist() == [[0.25], [0.25], [0.0]]


# ----------------------------------------------------------------------------------------------------
# in_features = 0
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_features_zero(backend, act):
    """x (3, 4, 0): the output is act(b) on every row and the bias gradient sums dY' over the 12 rows."""
    torch.manual_seed(7)
    x = torch.randn(3, 4, 0, device=DEVICE, dtype=torch.float64)
    w = torch.randn(5, 0, device=DEVICE, dtype=torch.float64)
    b = torch.rand(5, device=DEVICE, dtype=torch.float64) + 0.5  # relu' = 1: a bias gradient to see
    grad = torch.randn(3, 4, 5, device=DEVICE, dtype=torch.float64)
    with _backend(backend):
        ours = _run(lambda x, w, b: gradkernels.linear(x, w, b, act), x, w, b, grad)
    theirs = _run(lambda x, w, b: _torch_act(F.linear(x, w, b), act, backend), x, w, b, grad)
    for name, a, t in zip(("output", "dx", "dw", "db"), ours, theirs):
        assert a.shape == t.shape, name
        torch.testing.assert_close(a, t, msg=lambda m: f"{name}: {m}")
    assert ours[3].abs().min() > 0  # a real reduction over rows, not zeros


# ----------------------------------------------------------------------------------------------------
# Meta tensors and FakeTensors
# ----------------------------------------------------------------------------------------------------


def _shapes_after_backward(device, dtype=torch.float32):
    """Forward and backward through every public entry point; shapes, dtypes and strides of results."""
    torch.manual_seed(8)
    x = torch.randn(2, 7, 16, device=device, dtype=dtype, requires_grad=True)
    lin = gradkernels.nn.Linear(16, 24, activation="gelu", device=device, dtype=dtype)
    mha = gradkernels.nn.MultiHeadAttention(16, 4, num_kv_heads=2, causal=True, device=device, dtype=dtype)
    q = torch.randn(1, 7, 4, 8, device=device, dtype=dtype).transpose(1, 2).requires_grad_()  # (B, H, L, D)
    kv = torch.randn(1, 2, 5, 8, device=device, dtype=dtype, requires_grad=True)
    outs = {
        "linear": gradkernels.linear(x, lin.weight, lin.bias, "silu"),
        "nn.Linear": lin(x),
        "nn.MultiHeadAttention": mha(x),
    }
    out, lse = gradkernels.attention(q, kv, kv, causal=True, return_lse=True)
    outs["attention"], outs["lse"] = out, lse
    outs["sdpa"] = gradkernels.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    total = sum(t.sum() for name, t in outs.items() if name != "lse")
    total.backward()
    grads = {"x": x.grad, "q": q.grad, "kv": kv.grad, "weight": lin.weight.grad,
             "mha.q_proj.weight": mha.q_proj.weight.grad}
    # Strides of size-1 dims carry no layout information (views may set them to anything).
    return {name: (tuple(t.shape), t.dtype, tuple(st for n, st in zip(t.shape, t.stride()) if n != 1))
            for name, t in {**outs, **grads}.items()}


def test_meta_tensors_give_the_shapes_of_a_real_run():
    """device="meta": forward and backward shape inference like torch's layers (no compute)."""
    meta = _shapes_after_backward("meta")
    real = _shapes_after_backward(DEVICE)
    assert meta == real


def test_fake_tensors_give_the_shapes_of_a_real_run():
    with FakeTensorMode():
        fake = _shapes_after_backward(DEVICE)
    assert fake == _shapes_after_backward(DEVICE)


def test_modules_build_under_the_meta_device_context():
    """``with torch.device("meta")`` model construction, then ``to_empty`` and a real forward."""
    with torch.device("meta"):
        mha = gradkernels.nn.MultiHeadAttention(16, 2, causal=True)
    assert mha.q_proj.weight.is_meta
    mha = mha.to_empty(device=DEVICE)
    for p in mha.parameters():
        torch.nn.init.normal_(p, std=0.2)
    y = mha(torch.randn(1, 5, 16, device=DEVICE))
    assert y.shape == (1, 5, 16) and torch.isfinite(y).all()
