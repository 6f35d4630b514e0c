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
    and ``_linear_split_reduce_kernel`` sums the partials in a fixed order and applies the epilogue. No
    atomics anywhere, so results are bitwise identical from run to run.

Follows: Triton tutorial 03 (matrix multiplication), Liger-Kernel and attorch (three tiers: jit kernel,
launcher, autograd Function), split-K as in CUTLASS's "serial reduction" variant.

dtypes: fp16, bf16 (CUDA only: Triton's interpreter cannot do bf16 arithmetic), fp32 (tf32 only where
torch allows it: INPUT_PRECISION), fp64 (fp64 accumulation). Accumulation in fp32 otherwise.

Shapes: any M, N, K >= 1, any strides; row/column offsets are int64 so tensors past 2^31 elements work.
Limits: fp64 and fp32 use smaller tiles (shared memory); no fp8.
"""

import triton
import triton.language as tl

from ._common import activation_grad, apply_activation, load_tile, store_tile

# ----------------------------------------------------------------------------------------------------
# Config factories
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, maxnreg])
_MATMUL_TILES = [
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 32, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (64, 64, 32, 8, 4, 3),
    (32, 64, 32, 8, 4, 3),
    # Last: the launchers' fallback when keep() rejects every tile (fp64 with a fused activation
    # derivative, whose erf alone takes most of the registers): 16 rows, the least tl.dot takes.
    # maxnreg=255: without it ptxas caps registers to fit more blocks per SM and spills a few bytes
    # (fp64 dW with gelu on sm_90: 168 registers + 16 B of stack); with it, at most 232 and no spill.
    (16, 32, 16, 8, 4, 3, 255),
]

# Under TRITON_INTERPRET=1 autotuning cannot run (it times configs on a GPU): one pinned config.
# Small enough that test shapes such as 97 or 257 span several tiles and exercise the masks.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

# Tiles of the split-K reduce kernel (memory bound: wide rows for coalescing).
REDUCE_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 128}
REDUCE_WARPS = 4

# Shared memory per SM usable by one CTA (bytes): sm_80 164 KiB - 1 KiB reserved; sm_90 228 - 1 KiB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def matmul_smem_bytes(block_m, block_n, block_k, num_stages, dtype_bytes):
    """Shared memory the software pipeline needs: one A and one B tile per stage."""
    return (block_m * block_k + block_k * block_n) * dtype_bytes * num_stages


def keep(config, dtype_bytes, arch=90, flags=None):
    """Whether a matmul config suits a launch on ``arch`` with operands of ``dtype_bytes`` bytes.

    The rule the autotune lists are pruned by, calibrated and checked with the AOT compile report
    (``python -m gradkernels.aot --kernel linear --include-pruned``: every config this keeps must
    compile for sm_80 and sm_90 without spills, within shared memory, on tensor cores):

    - the pipeline buffers fit shared memory (``SMEM_LIMIT``);
    - on sm_90, tensor-core tiles have 64 rows per warp group (wgmma; smaller tiles fall back to
      mma.sync);
    - the tiles a program keeps in registers fit a per-thread budget. Estimated in 32-bit words per
      thread: the accumulator; the operand fragments where they live in registers (twice, on the FMA
      path of fp64 / fp32 "ieee"; (A + B) x bytes / 8 through sm_80's mma.sync; wgmma reads them
      from shared memory); what a fused activation keeps live: its derivative in the prologue about
      four A tiles besides one accumulator, an epilogue activation one accumulator, the bias-gradient
      row sums of dW half of one. The budgets per architecture and path are calibrated on the AOT
      report: they are the largest that keep no spilling config for any launch it compiles. They are
      not register counts; on sm_80 they are low for 4-byte operands because its ptxas trades a few
      spilled bytes for occupancy whenever the block size is known (see bench/GPU.md).

    Args:
        config: a ``triton.Config`` from :func:`get_linear_configs`.
        dtype_bytes: element size of the operands (2, 4 or 8).
        arch: compute capability as an int (80, 86, 89, 90).
        flags: the launch's constexpr flags as the autotuner hands them to its prune (``PROLOGUE_ACT``,
            ``EPILOGUE_ACT``, ``ROW_SUM``, ``INPUT_PRECISION``). None when unknown: then the config must
            suit every kind of launch (forward with an activation, dW with one and the bias gradient).

    Returns:
        True if the autotuner may try the config.
    """
    if flags is None:
        precisions = ("tf32", "ieee") if dtype_bytes == 4 else ("ieee",)
        return all(keep(config, dtype_bytes, arch, dict(kind, INPUT_PRECISION=p))
                   for p in precisions
                   for kind in ({"EPILOGUE_ACT": "gelu"}, {"PROLOGUE_ACT": "gelu", "ROW_SUM": True}))
    kw = config.kwargs
    bm, bn, bk, warps = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps
    if matmul_smem_bytes(bm, bn, bk, config.num_stages, dtype_bytes) > SMEM_LIMIT.get(arch, SMEM_LIMIT[80]):
        return False
    fma = dtype_bytes == 8 or (dtype_bytes == 4 and flags.get("INPUT_PRECISION") != "tf32")
    if arch >= 90 and not fma and bm < 16 * warps:
        return False
    threads = 32 * warps
    wide = 2 if dtype_bytes == 8 else 1  # fp64 values take two registers
    acc = bm * bn * wide / threads
    a_tile = bm * bk * wide / threads
    b_tile = bk * bn * wide / threads
    words = acc
    if fma:
        words += 2 * (a_tile + b_tile)
    elif arch < 90:
        words += (a_tile + b_tile) * dtype_bytes / 8
    if flags.get("EPILOGUE_ACT") is not None:
        words += acc
    if flags.get("PROLOGUE_ACT") is not None:
        words += acc + 4 * a_tile
    if flags.get("ROW_SUM"):
        words += acc / 2
    path = ("fma64" if dtype_bytes == 8 else "fma32") if fma else ("tc16" if dtype_bytes == 2 else "tc32")
    budget = {80: {"tc16": 160, "tc32": 48, "fma32": 96, "fma64": 160},
              90: {"tc16": 192, "tc32": 192, "fma32": 208, "fma64": 160}}[90 if arch >= 90 else 80]
    return words <= budget[path]


def get_linear_configs():
    """Every config the matmul autotuner may try (before pruning by :func:`keep`)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s,
                      maxnreg=maxnreg[0] if maxnreg else None)
        for bm, bn, bk, g, w, s, *maxnreg in _MATMUL_TILES
    ]


def choose_split(m, n, k, num_sms, tile=128, min_k_per_split=256, max_split=16):
    """How many ways to split the reduction of an (m x k) @ (k x n) product.

    1 when the (m, n) output tiles already fill half the GPU's SMs; otherwise enough splits to fill it,
    each with at least ``min_k_per_split`` of the reduction. The result does not depend on the split
    count beyond rounding: partials are summed in a fixed order.
    """
    tiles = triton.cdiv(m, tile) * triton.cdiv(n, tile)
    if tiles == 0 or tiles * 2 >= num_sms:
        return 1
    return max(1, min(max_split, num_sms // tiles, k // min_k_per_split))


def bucket(n):
    """Autotune key bucket: the next power of two, so a new batch size does not retune or recompile."""
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


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
def _linear_kernel(
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
def _linear_split_reduce_kernel(
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
