"""Launchers of the fused linear kernels: validate -> allocate -> grid -> launch.

Every launcher accepts preallocated outputs (``out=`` and friends) so the autograd Functions and the
benchmarks can reuse buffers.
"""

from __future__ import annotations

import functools

import torch
import triton

from .. import _device
from .common import ACTIVATIONS, FLOAT_DTYPES, accumulator_dtype
from ..kernels import linear as kernels
from ..kernels import linear_configs as configs




def check_linear_args(x, weight, bias=None, activation=None, *, same_dtype=True):
    """Raise ``TypeError``/``ValueError`` naming the bad argument, before anything is launched."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x.shape[-1] must equal in_features = weight.shape[1] = {weight.shape[1]}, "
            f"got x of shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (out_features,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all must be on one device")
    if same_dtype:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all must have one dtype")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _prune(tiles, named_args, **flags):
    """The autotuner's ``early_config_prune``: :func:`gradkernels.kernels.linear_configs.prune` for the
    launch's operand size and device architecture."""
    a = named_args["A"]
    return configs.prune(tiles, {**named_args, **flags}, dtype_bytes=a.element_size(),
                         arch=_device.device_arch(a.device))


@functools.lru_cache(maxsize=None)
def _autotuned(role: str):
    """One autotuner per role (forward, dX, dW): their best tiles differ for the same sizes."""
    return triton.autotune(
        configs=configs.get_linear_configs(),
        key=["M_KEY", "N_KEY", "K_KEY", "SPLIT_K", "TMA_OK"],
        prune_configs_by={"early_config_prune": _prune},
    )(kernels.linear_kernel)


def matmul(a, b, *, out, bias=None, pre_in=None, pre_out=None, prologue_act=None, epilogue_act=None,
           row_sum=None, split=1, role="fwd"):
    """``out = epilogue(prologue(a) @ b)``; see ``gradkernels.kernels.linear`` for the operand views.

    Args:
        a: (M, K) view, any strides. b: (K, N) view, any strides. out: (M, N) output.
        bias: (N,) added in the epilogue. pre_out: (M, N) receives the pre-activation.
        pre_in: (M, K) pre-activation indexed like ``a``; ``a`` is scaled by ``act'(pre_in)`` on load.
        row_sum: (M,) receives the row sums of the scaled ``a`` (the bias gradient).
        split: how many ways the K reduction is split (deterministic partials + reduce).
        role: "fwd", "dx" (tokens in M) or "dw" (tokens in K): one autotuner per role.
    """
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        if row_sum is not None:
            row_sum.zero_()
        return out
    tokens = "k" if role == "dw" else "m"
    # Few tokens: compute out^T = b^T @ a^T (views only), the bias one per row (configs.swap_operands).
    # Not with a prologue or row sums, which belong to a's rows.
    swap = tokens == "m" and pre_in is None and row_sum is None and configs.swap_operands(m, n)
    if swap:
        a, b, out = b.t(), a.t(), out.t()
        pre_out = None if pre_out is None else pre_out.t()
        m, n, tokens = n, m, "n"
    acc_dtype = accumulator_dtype(a.dtype)
    split = max(1, min(split, triton.cdiv(k, 16))) if k > 0 else 1
    ws = torch.empty((split, m, n), device=a.device, dtype=acc_dtype) if split > 1 else None
    rs = row_sum
    if row_sum is not None and split > 1:
        rs = torch.empty((split, m), device=a.device, dtype=acc_dtype)
    tma_ok, a_t, b_t = configs.tma_layout(a, b)
    pre_in_strides = pre_in.stride() if pre_in is not None else (0, 0)
    pre_out_strides = pre_out.stride() if pre_out is not None else (0, 0)
    args = (
        a, b, out, bias, pre_in, pre_out, ws, rs,
        m, n, k, *configs.autotune_keys(m, n, k, tokens), int(tma_ok),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        *pre_in_strides, *pre_out_strides, bias.stride(0) if bias is not None else 0,
    )
    flags = dict(
        HAS_BIAS=bias is not None and split == 1,
        BIAS_ALONG_M=swap,
        PROLOGUE_ACT=prologue_act,
        EPILOGUE_ACT=epilogue_act if split == 1 else None,
        STORE_PRE=pre_out is not None and split == 1,
        ROW_SUM=row_sum is not None,
        SPLIT_K=split,
        EVEN_K=configs.even_k(k),
        INPUT_PRECISION=_device.dot_precision(a.dtype, a.device),
    )
    if tma_ok:  # the operands' orientation for TMA tiles (the kernel's defaults otherwise)
        flags.update(A_T=a_t, B_T=b_t)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        if meta.get("PERSISTENT"):  # one program per SM walks the tiles of every split
            return (min(_device.num_sms(), tiles * split), 1)
        return (tiles, split)

    if _device.use_autotune():
        if tma_ok:
            _device.ensure_scratch_allocator()  # TMA tiles build their descriptors in global scratch
        _autotuned(role + ("-swapped" if swap else ""))[grid](*args, **flags)
    else:
        pinned = configs.INTERPRETER_CONFIG
        if pinned.get("TMA") and not tma_ok:  # the tests pin a TMA tile to run the descriptor path
            pinned = {name: value for name, value in pinned.items() if name not in ("TMA", "PERSISTENT")}
        kernels.linear_kernel[grid](*args, **flags, **pinned)

    if split > 1:
        _split_reduce(ws, out, bias, pre_out, epilogue_act, split, bias_along_m=swap)
        if row_sum is not None:
            # (split, M) partials read as (split, 1, M): one output row of M columns.
            _split_reduce(rs.view(split, 1, m), row_sum.view(1, m), None, None, None, split)
    return out.t() if swap else out


def _split_reduce(ws, out, bias, pre_out, activation, split, bias_along_m=False):
    _, m, n = ws.shape
    cfg = configs.REDUCE_CONFIG
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    pre_strides = pre_out.stride() if pre_out is not None else (0, 0)
    kernels.linear_split_reduce_kernel[grid](
        ws, out, bias, pre_out, m, n, out.stride(0), out.stride(1), *pre_strides,
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, BIAS_ALONG_M=bias_along_m, ACTIVATION=activation, STORE_PRE=pre_out is not None,
        SPLIT_K=split,
        num_warps=configs.REDUCE_WARPS, **cfg,
    )


def linear_forward(x2, weight, bias=None, activation=None, store_pre=False, *, out=None, pre=None,
                   split=None):
    """Forward of ``act(x2 @ weight^T + bias)`` for a 2-D ``x2`` (M, K).

    Returns:
        ``(out, pre)``: the output (M, N), and the pre-activation when ``store_pre`` and an activation
        are given (else None).
    """
    m, k = x2.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if store_pre and activation is not None and pre is None:
        pre = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    elif activation is None:
        pre = None
    if split is None:
        split = configs.choose_split(m, n, k, _device.num_sms())
    matmul(x2, weight.t(), out=out, bias=bias, pre_out=pre, epilogue_act=activation, split=split, role="fwd")
    return out, pre


def linear_backward(grad2, x2, weight, pre, activation, need_dx, need_dw, need_db, *, split=None):
    """Gradients of :func:`linear_forward` for the ones asked for.

    ``dY' = dY * act'(pre)`` is applied while loading dY in both products (no elementwise pass);
    ``db`` is accumulated inside the dW product. Returns ``(dx, dw, db)`` with None for those not needed.
    """
    m, n = grad2.shape
    act = activation if pre is not None else None
    dx = dw = db = None
    if need_dx:
        dx = torch.empty((m, weight.shape[1]), device=grad2.device, dtype=grad2.dtype)
        matmul(grad2, weight, out=dx, pre_in=pre, prologue_act=act, role="dx")
    if need_dw and x2.shape[1] == 0:
        # in_features = 0: dW is empty, but the bias gradient is still the row sum of dY' (below).
        dw = torch.empty((n, 0), device=grad2.device, dtype=grad2.dtype)
    elif need_dw:
        k = x2.shape[1]
        dw = torch.empty((n, k), device=grad2.device, dtype=grad2.dtype)
        db = torch.empty((n,), device=grad2.device, dtype=grad2.dtype) if need_db else None
        dw_split = configs.choose_split(n, k, m, _device.num_sms()) if split is None else split
        matmul(grad2.t(), x2, out=dw, pre_in=None if pre is None else pre.t(), prologue_act=act,
               row_sum=db, split=dw_split, role="dw")
    if need_db and db is None:
        # Bias trainable with a frozen weight: the dW launch against a column of ones is a one-pass
        # row reduction of dY' = dY * act'(pre) that still applies act' while loading.
        ones = grad2.new_ones((m, 1))
        db = torch.empty((n,), device=grad2.device, dtype=grad2.dtype)
        scratch = torch.empty((n, 1), device=grad2.device, dtype=grad2.dtype)
        dw_split = configs.choose_split(n, 1, m, _device.num_sms()) if split is None else split
        matmul(grad2.t(), ones, out=scratch, pre_in=None if pre is None else pre.t(), prologue_act=act,
               row_sum=db, split=dw_split, role="dw")
    return dx, dw, db
