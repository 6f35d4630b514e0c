"""Fused linear layer: ``act(x @ W^T + b)`` forward and backward as tiled Triton matmuls.

Algorithm
    One matmul kernel, ``C = prologue(A) @ B`` with a fused epilogue, serves all three products of a
    linear layer by viewing the operands through their strides (no transposed copies):

    - forward   ``Y  = X @ W^T``        A = X (M, K),     B = W^T (K, N)   epilogue: + bias, act, PRE
    - backward  ``dX = dY' @ W``        A = dY (M, N),    B = W (N, K)     prologue: dY' = dY * act'(PRE)
    - backward  ``dW = dY'^T @ X``      A = dY^T (N, M),  B = X (M, K)     prologue as above, and the
      row sums of dY'^T (= db) accumulated in the same loop by the programs of the first column block.

    Output tiles are visited in grouped order (GROUP_M rows of tiles at a time) for L2 reuse, as in the
    Triton matmul tutorial. When the output tiles cannot fill the GPU (small M in forward, a narrow layer's
    dW over many tokens), the reduction dimension is split: each split writes an fp32 (fp64) partial tile
    and ``linear_split_reduce_kernel`` sums the partials in a fixed order and applies the epilogue. No
    atomics anywhere, so results are bitwise identical from run to run.

Follows: Triton tutorial 03 (matrix multiplication), Liger-Kernel and attorch (three tiers: jit kernel,
launcher, autograd Function), split-K as in CUTLASS's "serial reduction" variant.

dtypes: fp16, bf16 (CUDA only: Triton's interpreter cannot do bf16 arithmetic), fp32 (tf32 only where
torch allows it: INPUT_PRECISION), fp64 (fp64 accumulation). Accumulation in fp32 otherwise.

Shapes: any M, N, K >= 1, any strides; row/column offsets are int64 so tensors past 2^31 elements work.
Limits: fp64 and fp32 use smaller tiles (shared memory); no fp8.

Tiles, split-K and the autotune keys: ``linear_configs.py``.
"""

import triton
import triton.language as tl

from ._common import activation_grad, apply_activation, load_tile, store_tile


@triton.jit
def _bias_act_store(acc, C, BIAS, PRE_OUT, offs_m, offs_n, M, N,
                    stride_cm, stride_cn, stride_pom, stride_pon, stride_bias,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr):
    """Epilogue: ``+ bias``; store the pre-activation if backward needs it; ``act``; store."""
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc += b.to(acc.dtype)[None, :]
    if STORE_PRE:
        store_tile(PRE_OUT, acc.to(PRE_OUT.dtype.element_ty), offs_m, offs_n, stride_pom, stride_pon, M, N)
    out = apply_activation(acc, ACTIVATION)
    store_tile(C, out.to(C.dtype.element_ty), offs_m, offs_n, stride_cm, stride_cn, M, N)


@triton.jit
def linear_kernel(
    # pointers
    A, B, C, BIAS, PRE_IN, PRE_OUT, WS, ROWSUM,
    # sizes
    M, N, K, M_BUCKET,  # M_BUCKET: autotune key only
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pim, stride_pik,  # PRE_IN, indexed like A (prologue)
    stride_pom, stride_pon,  # PRE_OUT, indexed like C (epilogue)
    stride_bias,
    # constexpr flags
    HAS_BIAS: tl.constexpr,
    PROLOGUE_ACT: tl.constexpr,  # A <- A * act'(PRE_IN): the backward's dY' = dY * act'(pre)
    EPILOGUE_ACT: tl.constexpr,  # C <- act(C + bias)
    STORE_PRE: tl.constexpr,
    ROW_SUM: tl.constexpr,  # also write sum_k A'[m, k] (db in the dW launch)
    SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C[M, N] = prologue(A)[M, K] @ B[K, N]`` with a fused epilogue, optionally split over K.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). With SPLIT_K > 1, WS (SPLIT_K, M, N) and
    ROWSUM (SPLIT_K, M) receive accumulator-dtype partials and the epilogue runs in the reduce kernel.
    """
    tl.static_assert(BLOCK_K >= 16, "tl.dot needs K tiles of at least 16")
    ACC_DTYPE: tl.constexpr = tl.float64 if A.dtype.element_ty == tl.float64 else tl.float32

    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M rows of tiles share the same B columns while they are in L2.
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    # int64 row/column offsets: offset * stride may pass 2^31 on large tensors.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # This split's share of the reduction, whole BLOCK_K steps.
    k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_s.to(tl.int64) * k_chunk
    k_hi = tl.minimum(K, k_lo + k_chunk)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k in range(k_lo, k_hi, BLOCK_K):
        a = load_tile(A + k * stride_ak, offs_m, offs_k, stride_am, stride_ak, M, k_hi - k)
        if PROLOGUE_ACT is not None:
            pre = load_tile(PRE_IN + k * stride_pik, offs_m, offs_k, stride_pim, stride_pik, M, k_hi - k)
            # Rounded back to the operand dtype, as the unfused path's elementwise kernel would store it.
            a = (a.to(ACC_DTYPE) * activation_grad(pre.to(ACC_DTYPE), PROLOGUE_ACT)).to(A.dtype.element_ty)
        if ROW_SUM:
            row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
        b = load_tile(B + k * stride_bk, offs_k, offs_n, stride_bk, stride_bn, k_hi - k, N)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if SPLIT_K == 1:
        _bias_act_store(acc, C, BIAS, PRE_OUT, offs_m, offs_n, M, N,
                        stride_cm, stride_cn, stride_pom, stride_pon, stride_bias, HAS_BIAS, EPILOGUE_ACT, STORE_PRE)
        if ROW_SUM:
            if pid_n == 0:
                tl.store(ROWSUM + offs_m, row_sum.to(ROWSUM.dtype.element_ty), mask=offs_m < M)
    else:
        ws = WS + pid_s.to(tl.int64) * M * N
        store_tile(ws, acc, offs_m, offs_n, N, 1, M, N)
        if ROW_SUM:
            if pid_n == 0:
                tl.store(ROWSUM + pid_s.to(tl.int64) * M + offs_m, row_sum, mask=offs_m < M)


@triton.jit
def linear_split_reduce_kernel(
    # pointers
    WS, C, BIAS, PRE_OUT,
    # sizes
    M, N,
    # strides
    stride_cm, stride_cn, stride_pom, stride_pon, stride_bias,
    # constexpr flags
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, SPLIT_K: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partial tiles of WS (SPLIT_K, M, N) in a fixed order, then the epilogue."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = WS + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLIT_K):
        # One partial plane is at most a few SMs' worth of tiles (choose_split), so M * N fits int32.
        ptrs += M * N
        acc += tl.load(ptrs, mask=mask, other=0.0)
    _bias_act_store(acc, C, BIAS, PRE_OUT, offs_m, offs_n, M, N,
                    stride_cm, stride_cn, stride_pom, stride_pon, stride_bias, HAS_BIAS, ACTIVATION, STORE_PRE)
