"""Small @triton.jit helpers shared by the kernels: masked tile loads, activations and derivatives.

Activations are selected by a string constexpr (None, "relu", "gelu", "gelu_tanh", "silu"), resolved at
compile time, so each specialisation carries only its own code. They compute in the accumulator dtype
(fp32, or fp64 for fp64 inputs), and propagate NaN and +-inf forward and backward as
``torch.nn.functional`` does.
"""

import triton
import triton.language as tl

# 1/sqrt(2), sqrt(2/pi), 1/sqrt(2*pi): the constants of GELU and its derivative. Written tensor-first
# (x * C, not C * x) below: Triton 3.9's interpreter mishandles constexpr * tensor.
_RSQRT2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_RSQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def load_tile(ptr, offs_0, offs_1, stride_0, stride_1, bound_0, bound_1):
    """Load ``ptr[offs_0, offs_1]`` (any strides) with zeros outside ``[0, bound_0) x [0, bound_1)``.

    One masked helper replaces the EVEN_M / EVEN_N branch pairs: a mask that is all-true is cheap, and
    non-multiple-of-block shapes take the same code path as the rest.
    """
    mask = (offs_0[:, None] < bound_0) & (offs_1[None, :] < bound_1)
    return tl.load(ptr + offs_0[:, None] * stride_0 + offs_1[None, :] * stride_1, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, value, offs_0, offs_1, stride_0, stride_1, bound_0, bound_1):
    """Masked store, the counterpart of :func:`load_tile`."""
    mask = (offs_0[:, None] < bound_0) & (offs_1[None, :] < bound_1)
    tl.store(ptr + offs_0[:, None] * stride_0 + offs_1[None, :] * stride_1, value, mask=mask)


@triton.jit
def _sigmoid(x):
    # Written out rather than tl.sigmoid, which Triton's interpreter (3.9) cannot run.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tanh from one exp of a non-positive argument: no overflow, no libdevice call that differs
    # between backends.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """``act(x)`` for the activation named by ``ACTIVATION`` (None = identity)."""
    if ACTIVATION == "relu":
        # x < 0 is False for NaN: NaN passes through, as torch.relu keeps it.
        return tl.where(x < 0, 0.0, x)
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * _RSQRT2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * x * (1.0 + tanh((x + x * x * x * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACTIVATION == "silu":
        return x * _sigmoid(x)
    else:
        tl.static_assert(ACTIVATION is None, "unknown ACTIVATION: give it a branch here and in activation_grad")
        return x


@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """``act'(x)``; the backward multiplies the incoming gradient by it while loading.

    At NaN and +-inf these give what torch's autograd gives: relu passes the gradient at NaN (torch's
    threshold_backward zeroes only where x <= 0); the others give NaN at NaN and at +-inf (an inf * 0
    in the same place as torch's formulas).
    """
    if ACTIVATION == "relu":
        return tl.where(x <= 0, 0.0, 1.0)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * _RSQRT2))
        return cdf + x * tl.exp(-0.5 * x * x) * _RSQRT_2PI
    elif ACTIVATION == "gelu_tanh":
        t = tanh((x + x * x * x * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        du = (1.0 + x * x * (3.0 * _GELU_TANH_C)) * _SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif ACTIVATION == "silu":
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        tl.static_assert(ACTIVATION is None, "unknown ACTIVATION: give it a branch here and in apply_activation")
        return tl.full(x.shape, 1.0, x.dtype)
