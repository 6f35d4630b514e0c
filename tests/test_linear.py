"""Fused linear layer: forward and every gradient against a high-precision reference (two-oracle check).

The rule is gradkernels.testing's: |ours - ref| <= 2 (3 for gradients) x torch's own error in the same dtype
+ the operation's rounding-error bound (testing.linear_bounds); the reference is fp64, or extended precision
for fp64 inputs (testing.linear_reference).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gradkernels
from gradkernels import reference, testing
from gradkernels.ops import linear as linear_ops
from utils import DEVICE, DTYPES, ON_GPU, assert_close

ACTS = list(reference.ACTIVATIONS)


def _inputs(shape_x, n, dtype, bias=True, requires_grad=True):
    k = shape_x[-1]
    x = torch.randn(shape_x, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def _run(fn, x, w, b, grad):
    """Output and gradients of fn(x, w, b) for the given output gradient."""
    # detach() keeps the strides (clone() would make a strided slice contiguous).
    xs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
    y = fn(*xs)
    wanted = [t for t in xs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, grad) if wanted else ()
    return y, grads


def check_linear(x, w, b, act, grad=None):
    """ours vs the reference, with torch's same-dtype unfused path as the second oracle."""
    ours_y = gradkernels.linear(x, w, b, act)
    grad = torch.randn_like(ours_y) if grad is None else grad

    def ours(x_, w_, b_):
        return gradkernels.linear(x_, w_, b_, act)

    def torch_same(x_, w_, b_):
        return reference.activation_fn(F.linear(x_, w_, b_), act)

    y, g = _run(ours, x, w, b, grad)
    y_t, g_t = _run(torch_same, x, w, b, grad)
    ref = testing.linear_reference(x, w, b, act, grad)
    floor = testing.linear_bounds(x, w, b, act, grad)
    assert_close(y, y_t, ref["out"], 2, "output", floor=floor["out"])
    names = [n for n, t in zip(("dx", "dw", "db"), (x, w, b)) if t is not None and t.requires_grad]
    for name, a, a_t in zip(names, g, g_t):
        assert_close(a, a_t, ref[name], 3, name, floor=floor[name])


def check_forward_parts(x, w, b, act, out, pre):
    """A forward launch's output (and stored pre-activation, when not None) against the fp64 reference and
    torch's same-dtype ``act(F.linear)``."""
    ref = testing.linear_reference(x, w, b, act)
    floor = testing.linear_bounds(x, w, b, act)
    pre_t = F.linear(x, w, b)
    if pre is not None:
        assert_close(pre, pre_t, ref["pre"], 2, "pre-activation", floor=floor["pre"])
    assert_close(out, reference.activation_fn(pre_t, act), ref["out"], 2, "output", floor=floor["out"])


def check_backward_parts(x, w, b, act, grad, pre, dx, dw, db):
    """A backward launch's dX, dW and db for the output gradient ``grad`` and pre-activation ``pre``
    against the fp64 reference and torch's same-dtype ``dY' = grad * act'(pre)`` products."""
    ref = testing.linear_reference(x, w, b, act, grad, pre=pre)
    floor = testing.linear_bounds(x, w, b, act, grad, pre=pre)
    g_t = grad if act is None else grad * torch.func.grad(lambda p: reference.activation_fn(p, act).sum())(pre)
    assert_close(dx, g_t @ w, ref["dx"], 3, "dx", floor=floor["dx"])
    assert_close(dw, g_t.t() @ x, ref["dw"], 3, "dw", floor=floor["dw"])
    assert_close(db, g_t.sum(0), ref["db"], 3, "db", floor=floor["db"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (37, 97, 53), (113, 40, 257), (7, 600, 33)])
def test_shapes_and_dtypes(m, k, n, dtype):
    x, w, b = _inputs((m, k), n, dtype)
    check_linear(x, w, b, "gelu")


@pytest.mark.parametrize("m,k,n", [(5, 4097, 9), (3, 20, 4097)])
def test_long_dims(m, k, n):
    x, w, b = _inputs((m, k), n, torch.float16)
    check_linear(x, w, b, "gelu")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_activations(act, bias, dtype):
    x, w, b = _inputs((37, 80), 45, dtype, bias=bias)
    check_linear(x, w, b, act)


@pytest.mark.parametrize("shape", [(3, 11, 40), (2, 3, 5, 24)])
def test_leading_dims(shape):
    x, w, b = _inputs(shape, 29, torch.float32)
    y = gradkernels.linear(x, w, b, "silu")
    assert y.shape == (*shape[:-1], 29)
    check_linear(x, w, b, "silu")


def test_non_contiguous_inputs():
    # x transposed, weight a strided slice, output gradient transposed: no contiguity is assumed.
    x = torch.randn(48, 37, device=DEVICE).t().requires_grad_(True)  # (37, 48), strides (1, 37)
    w = (torch.randn(31, 96, device=DEVICE) / 48**0.5)[:, ::2].requires_grad_(True)  # strides (96, 2)
    b = torch.randn(62, device=DEVICE)[::2].requires_grad_(True)
    grad = torch.randn(31, 37, device=DEVICE).t()
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or grad.is_contiguous())
    check_linear(x, w, b, "gelu_tanh", grad=grad)


def test_flatten_is_a_view():
    # (B, L, K) contiguous input: the kernel reads it in place (no copy of x is saved).
    x, w, b = _inputs((4, 9, 32), 16, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gradkernels.linear(x, w, b, None)
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)


@pytest.mark.parametrize("act", [None, "gelu"])
def test_saves_only_what_backward_needs(act):
    x, w, b = _inputs((33, 24), 20, torch.float32)
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks:
        gradkernels.linear(x, w, b, act)
    shapes = sorted(tuple(t.shape) for t in saved)
    expected = [(20, 24), (33, 24)] + ([(33, 20)] if act else [])
    assert shapes == sorted(expected)
    # Only the weight needs a gradient: x is saved (for dW), the weight is not.
    saved.clear()
    with hooks:
        gradkernels.linear(x.detach(), w, None, act)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(33, 24)] + ([(33, 20)] if act else []))
    # No gradient at all: nothing is saved, and no pre-activation is allocated.
    saved.clear()
    with torch.no_grad(), hooks:
        gradkernels.linear(x, w, b, act)
    assert saved == []


@pytest.mark.parametrize("which", ["x", "w", "b", "xb"])
def test_partial_gradients(which):
    x, w, b = _inputs((21, 34), 19, torch.float64, requires_grad=False)
    x.requires_grad_("x" in which)
    w.requires_grad_("w" in which)
    b.requires_grad_("b" in which)
    check_linear(x, w, b, "gelu")


@pytest.mark.parametrize("split", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_split_k_forward(split, dtype):
    x, w, b = _inputs((19, 700), 45, dtype, requires_grad=False)
    out, pre = linear_ops.linear_forward(x, w, b, "gelu", True, split=split)
    ref = testing.linear_reference(x, w, b, "gelu")
    floor = testing.linear_bounds(x, w, b, "gelu")
    pre_t = F.linear(x, w, b)
    assert_close(pre, pre_t, ref["pre"], 2, "pre-activation", floor=floor["pre"])
    assert_close(out, F.gelu(pre_t), ref["out"], 2, "output", floor=floor["out"])


@pytest.mark.parametrize("k", [256, 200])
@pytest.mark.parametrize("split", [1, 5])
def test_even_and_ragged_k(k, split):
    # K = 256 is a whole number of steps for every BLOCK_K (the unmasked loop); 200 is not (the K mask).
    # Five splits of 256 or 200 leave the last splits empty (no step at all): they must add zeros.
    assert linear_ops.configs.even_k(256) and not linear_ops.configs.even_k(200)
    x, w, b = _inputs((37, k), 45, torch.float32, requires_grad=False)
    out, pre = linear_ops.linear_forward(x, w, b, "gelu", True, split=split)
    check_forward_parts(x, w, b, "gelu", out, pre)
    # dW and db reduce over the 37 tokens (ragged), dX over the 45 features.
    grad = torch.randn(37, 45, device=DEVICE)
    dx, dw, db = linear_ops.linear_backward(grad, x, w, pre, "gelu", True, True, True, split=split)
    check_backward_parts(x, w, b, "gelu", grad, pre, dx, dw, db)


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("split", [1, 3])
def test_few_tokens_swapped(act, split):
    # 5 tokens, 70 and 96 features: the forward and dX run swapped (out^T = b^T @ a^T, the bias one per
    # row of the swapped output), with and without split-K; dW (tokens in K) is never swapped.
    x, w, b = _inputs((5, 96), 70, torch.float32, requires_grad=False)
    assert linear_ops.configs.swap_operands(5, 70) and linear_ops.configs.swap_operands(5, 96)
    out, pre = linear_ops.linear_forward(x, w, b, act, act is not None, split=split)
    assert (pre is None) == (act is None)
    check_forward_parts(x, w, b, act, out, pre)
    grad = torch.randn(5, 70, device=DEVICE)
    dx, dw, db = linear_ops.linear_backward(grad, x, w, pre, act, True, True, True, split=split)
    check_backward_parts(x, w, b, act, grad, pre, dx, dw, db)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_split_dw_and_bias_grad(dtype):
    # Few output features over many tokens: the dW reduction (over tokens) is split.
    x, w, _ = _inputs((1100, 24), 20, dtype, requires_grad=False)
    grad = torch.randn(1100, 20, device=DEVICE, dtype=dtype)
    pre = F.linear(x, w)
    dx, dw, db = linear_ops.linear_backward(grad, x, w, pre, "silu", True, True, True, split=4)
    ref = testing.linear_reference(x, w, None, "silu", grad, pre=pre)
    floor = testing.linear_bounds(x, w, None, "silu", grad, pre=pre)
    g_t = grad * torch.func.grad(lambda p: F.silu(p).sum())(pre)
    assert_close(dw, g_t.t() @ x, ref["dw"], 3, "dw", floor=floor["dw"])
    assert_close(db, g_t.sum(0), ref["db"], 3, "db", floor=floor["db"])
    assert_close(dx, g_t @ w, ref["dx"], 3, "dx", floor=floor["dx"])


def test_deterministic():
    x, w, b = _inputs((150, 300), 24, torch.float32)
    runs = []
    for _ in range(2):
        y, grads = _run(lambda *a: gradkernels.linear(*a, "gelu"), x, w, b, torch.ones(150, 24, device=DEVICE))
        runs.append((y, *grads))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act):
    x, w, b = _inputs((3, 5), 4, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: gradkernels.linear(*a, act), (x, w, b), fast_mode=True)


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70), act=st.sampled_from(ACTS))
def test_fuzz_shapes(m, k, n, act):
    x, w, b = _inputs((m, k), n, torch.float64)
    check_linear(x, w, b, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_and_zero_k(dtype):
    # K = 0: the K loop runs no step (fp32: behind the kernel's n_k > 0 branch; fp64: without it).
    x, w, b = _inputs((0, 8), 5, dtype)
    assert gradkernels.linear(x, w, b).shape == (0, 5)
    x, w, b = _inputs((3, 0), 5, dtype)
    y = gradkernels.linear(x, w, b, "relu")
    torch.testing.assert_close(y, F.relu(b).expand(3, 5), rtol=0, atol=0)


def test_torch_backend_without_interpreter(monkeypatch):
    if ON_GPU:
        pytest.skip("the torch backend is the path for CPU tensors; this run has a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = _inputs((9, 13), 7, torch.float32)
    assert gradkernels.backend_for(x) == "torch"
    check_linear(x, w, b, "gelu")


def test_backend_for():
    t = torch.randn(2, device=DEVICE)
    assert gradkernels.backend_for(t) == ("triton" if ON_GPU else "interpreter")
    if not ON_GPU:
        # bf16 arithmetic is not supported by Triton's interpreter: such tensors take the torch path.
        assert gradkernels.backend_for(t.bfloat16()) == "torch"
    with pytest.raises(TypeError, match="torch.Tensor"):
        gradkernels.backend_for([1.0])


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_autocast(dtype):
    x, w, b = _inputs((17, 40), 23, torch.float32)
    with torch.autocast(DEVICE, dtype=dtype):
        y, grads = _run(lambda *a: gradkernels.linear(*a, "gelu"), x, w, b, torch.ones(17, 23, device=DEVICE))
        y_t, grads_t = _run(lambda *a: F.gelu(F.linear(*a)), x, w, b, torch.ones(17, 23, device=DEVICE))
    assert y.dtype == dtype == y_t.dtype
    # The kernels see the inputs cast to the autocast dtype; the gradients' cast back to fp32 is exact.
    cast = [t.detach().to(dtype) for t in (x, w, b)]
    ones = torch.ones(17, 23, device=DEVICE, dtype=dtype)
    ref = testing.linear_reference(*cast, "gelu", ones)
    floor = testing.linear_bounds(*cast, "gelu", ones)
    assert_close(y, y_t, ref["out"], 2, "output", floor=floor["out"])
    for name, a, a_t in zip(("dx", "dw", "db"), grads, grads_t):
        assert a.dtype == torch.float32  # gradients flow back to the fp32 leaves
        assert_close(a, a_t, ref[name], 3, name, floor=floor[name])


# ----------------------------------------------------------------------------------------------------
# nn.Linear
# ----------------------------------------------------------------------------------------------------


def test_module_state_dict_round_trip():
    ours = gradkernels.nn.Linear(40, 24, activation="gelu", device=DEVICE, dtype=torch.float64)
    theirs = torch.nn.Linear(40, 24, device=DEVICE, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    assert set(theirs.state_dict()) == set(ours.state_dict()) == {"weight", "bias"}
    fresh = torch.nn.Linear(40, 24, device=DEVICE, dtype=torch.float64)
    ours.load_state_dict(fresh.state_dict())
    x = torch.randn(5, 40, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref = testing.linear_reference(x, fresh.weight, fresh.bias, "gelu")["out"]
        floor = testing.linear_bounds(x, fresh.weight, fresh.bias, "gelu")["out"]
        assert_close(ours(x), F.gelu(fresh(x)), ref, 2, floor=floor)
    assert isinstance(ours, torch.nn.Linear)
    assert "activation='gelu'" in repr(ours)


def test_module_no_bias():
    m = gradkernels.nn.Linear(16, 8, bias=False, device=DEVICE, dtype=torch.float64)
    assert m.bias is None and set(m.state_dict()) == {"weight"}
    x = torch.randn(3, 16, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref = testing.linear_reference(x, m.weight)["out"]
        assert_close(m(x), x @ m.weight.t(), ref, 2, floor=testing.linear_bounds(x, m.weight)["out"])


def test_from_linear_shares_parameters():
    base = torch.nn.Linear(12, 10, device=DEVICE, dtype=torch.float64)
    m = gradkernels.nn.Linear.from_linear(base, activation="relu")
    assert m.weight is base.weight and m.bias is base.bias
    x = torch.randn(6, 12, device=DEVICE, dtype=torch.float64)
    m(x).sum().backward()
    assert base.weight.grad is not None
    ones = torch.ones(6, 10, device=DEVICE, dtype=torch.float64)
    ref = testing.linear_reference(x, base.weight, base.bias, "relu", ones)["dw"]
    floor = testing.linear_bounds(x, base.weight, base.bias, "relu", ones)["dw"]
    assert_close(base.weight.grad, (F.relu(base(x)) > 0).double().t() @ x, ref, 3, "dw", floor=floor)
    with pytest.raises(TypeError, match="module must be a torch.nn.Linear"):
        gradkernels.nn.Linear.from_linear(torch.nn.ReLU())


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch
# ----------------------------------------------------------------------------------------------------

_X = torch.randn(4, 8)
_W = torch.randn(6, 8)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(4, 7), _W), {}, ValueError, r"x.shape\[-1\] must equal in_features"),
        ((_X, _W, torch.randn(5)), {}, ValueError, r"bias must have shape \(out_features,\)"),
        ((_X, _W.double()), {}, TypeError, "weight has dtype torch.float64 but x has torch.float32"),
        ((_X, _W, None), {"activation": "tanh"}, ValueError, "activation must be one of"),
        ((_X.long(), _W), {}, TypeError, "x must be a floating-point tensor"),
        ((_X, torch.randn(6, 8, 1)), {}, ValueError, "weight must be 2-D"),
        ((_X, _W.numpy()), {}, TypeError, "weight must be a torch.Tensor"),
        ((torch.tensor(1.0), _W), {}, ValueError, "at least 1 dimension"),
        ((_X, _W, torch.randn(6).double()), {}, TypeError, "bias has dtype"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gradkernels.linear(*args, **kwargs)


def test_bad_module_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        gradkernels.nn.Linear(4, 4, activation="swish")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and ~6 GB) for a tensor past 2^31 elements")
def test_int64_offsets():
    # x has 2^31 + 2^20 elements: row offsets overflow int32 unless computed in int64.
    k = 2048
    m = (2**31 + 2**20) // k
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(64, k, device="cuda", dtype=torch.float16) / k**0.5
    y = gradkernels.linear(x, w)
    rows = torch.tensor([0, m // 2, m - 1], device="cuda")
    ref = testing.linear_reference(x[rows], w)["out"]
    assert_close(y[rows], (x[rows] @ w.t()), ref, 2, "last rows", floor=testing.linear_bounds(x[rows], w)["out"])
