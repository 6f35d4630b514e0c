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

    On sm_90 the TMA tiles (``TMA``, 16-bit operands with a contiguous dimension and 16-byte aligned strides,
    ``linear_configs.tma_layout``) read A and B through device-side tensor descriptors (Hopper's TMA unit)
    instead of per-thread cp.async addresses; each operand's descriptor is over the operand or over its
    transpose, whichever has the contiguous last dimension (``A_T``, ``B_T``), and boxes past the end read
    zeros, so that loop has neither wrapped indices nor a K mask.

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

from ._common import activation_grad, apply_activation, store_tile


@triton.jit
def _bias_act_store(acc, C, BIAS, PRE_OUT, offs_m, offs_n, M, N,
                    stride_cm, stride_cn, stride_pom, stride_pon, stride_bias,
                    HAS_BIAS: tl.constexpr, BIAS_ALONG_M: tl.constexpr, ACTIVATION: tl.constexpr,
                    STORE_PRE: tl.constexpr):
    """Epilogue: ``+ bias`` (one per column, or per row in a swapped launch); store the pre-activation if
    backward needs it; ``act``; store."""
    if HAS_BIAS:
        if BIAS_ALONG_M:
            b = tl.load(BIAS + offs_m * stride_bias, mask=offs_m < M, other=0.0)
            acc += b.to(acc.dtype)[:, None]
        else:
            b = tl.load(BIAS + offs_n * stride_bias, mask=offs_n < N, other=0.0)
            acc += b.to(acc.dtype)[None, :]
    if STORE_PRE:
        store_tile(PRE_OUT, acc.to(PRE_OUT.dtype.element_ty), offs_m, offs_n, stride_pom, stride_pon, M, N)
    out = apply_activation(acc, ACTIVATION)
    store_tile(C, out.to(C.dtype.element_ty), offs_m, offs_n, stride_cm, stride_cn, M, N)


@triton.jit
def _load_k_step(ptrs, offs_k, k_left, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
    """One K step of an operand tile through its pointer tile: unmasked when K is a whole number of
    blocks (``EVEN_K``); else the reduction index ``offs_k`` (along axis ``K_AXIS``) is masked against the
    ``k_left`` elements that remain, zeros beyond.

    Rows and columns need no mask: the kernel wraps their indices into range (see ``linear_kernel``).
    """
    if EVEN_K:
        return tl.load(ptrs)
    else:
        if K_AXIS == 1:
            mask = offs_k[None, :] < k_left
        else:
            mask = offs_k[:, None] < k_left
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _box_descriptor(base, R, C, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    T: tl.constexpr):
    """TMA descriptor of an (R, C) operand read in (BLOCK_R, BLOCK_C) boxes: over the operand itself when its
    column stride is 1, or (``T``) over its transpose when its row stride is 1 (the launcher checked one of
    them, and 16-byte aligned strides and base: ``linear_configs.tma_layout``)."""
    if T:
        return tl.make_tensor_descriptor(base, shape=[C, R], strides=[stride_c, 1], block_shape=[BLOCK_C, BLOCK_R])
    else:
        return tl.make_tensor_descriptor(base, shape=[R, C], strides=[stride_r, 1], block_shape=[BLOCK_R, BLOCK_C])


@triton.jit
def _load_box(desc, r, c, T: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) box of a :func:`_box_descriptor` operand at ``(r, c)`` (``T``: read from the
    transpose and transposed in shared memory, where wgmma takes either major order). Boxes past the end
    of the tensor read zeros."""
    if T:
        return desc.load([c, r]).T
    else:
        return desc.load([r, c])


@triton.jit(do_not_specialize=["M_KEY", "N_KEY", "K_KEY", "TMA_OK"])
def linear_kernel(
    # pointers
    A, B, C, BIAS, PRE_IN, PRE_OUT, WS, ROWSUM,
    # sizes
    M, N, K,
    M_KEY, N_KEY, K_KEY,  # the autotuner's key and the prune's view of the sizes (unused in the kernel)
    TMA_OK,  # autotune key only: A and B allow TMA tiles (linear_configs.tma_layout)
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pim, stride_pik,  # PRE_IN, indexed like A (prologue)
    stride_pom, stride_pon,  # PRE_OUT, indexed like C (epilogue)
    stride_bias,
    # constexpr flags
    HAS_BIAS: tl.constexpr,
    BIAS_ALONG_M: tl.constexpr,  # one bias per row of C (a swapped launch computing Y^T), not per column
    PROLOGUE_ACT: tl.constexpr,  # A <- A * act'(PRE_IN): the backward's dY' = dY * act'(pre)
    EPILOGUE_ACT: tl.constexpr,  # C <- act(C + bias)
    STORE_PRE: tl.constexpr,
    ROW_SUM: tl.constexpr,  # also write sum_k A'[m, k] (db in the dW launch)
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # every split's share of K is whole BLOCK_K steps: no mask in the loop
    INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    # A and B through TMA descriptors (a tile's choice; sm_90+, 16-bit, where TMA_OK). A_T: A's descriptor
    # is over A^T (stride_am = 1: dW's dY^T); B_T: B's over B^T (stride_bk = 1: the forward's W^T).
    TMA: tl.constexpr = False, A_T: tl.constexpr = False, B_T: tl.constexpr = False,
    # A persistent grid (TMA tiles): one program per SM walks the output tiles (and splits), so the next
    # tile's first loads overlap this one's epilogue.
    PERSISTENT: tl.constexpr = False,
):
    """``C[M, N] = prologue(A)[M, K] @ B[K, N]`` with a fused epilogue, optionally split over K.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K); ``PERSISTENT``: (at most one program per SM, 1),
    each taking the tiles ``program_id, program_id + num_programs, ...`` of the split-major tile order. With SPLIT_K > 1, WS (SPLIT_K, M, N) and
    ROWSUM (SPLIT_K, M) receive accumulator-dtype partials and the epilogue runs in the reduce kernel.
    The launcher sets EVEN_K when K is a multiple of every BLOCK_K it may pick.
    """
    tl.static_assert(BLOCK_K >= 16, "tl.dot needs K tiles of at least 16")
    tl.static_assert(TMA or not PERSISTENT, "persistent tiles read through TMA")
    if TMA:
        # Rows, columns and K past the end read as zeros: no wrapped indices, no K mask.
        a_desc = _box_descriptor(A, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        b_desc = _box_descriptor(B, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)
    else:
        a_desc = None
        b_desc = None
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles * SPLIT_K, tl.num_programs(0), flatten=True):
            _linear_tile(tile % tiles, tile // tiles, A, B, C, BIAS, PRE_IN, PRE_OUT, WS, ROWSUM, a_desc, b_desc,
                         M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                         stride_pim, stride_pik, stride_pom, stride_pon, stride_bias,
                         HAS_BIAS, BIAS_ALONG_M, PROLOGUE_ACT, EPILOGUE_ACT, STORE_PRE, ROW_SUM, SPLIT_K, EVEN_K,
                         INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, A_T, B_T, False)
    else:
        _linear_tile(tl.program_id(0), tl.program_id(1), A, B, C, BIAS, PRE_IN, PRE_OUT, WS, ROWSUM, a_desc, b_desc,
                     M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     stride_pim, stride_pik, stride_pom, stride_pon, stride_bias,
                     HAS_BIAS, BIAS_ALONG_M, PROLOGUE_ACT, EPILOGUE_ACT, STORE_PRE, ROW_SUM, SPLIT_K, EVEN_K,
                     INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, A_T, B_T, True)


@triton.jit
def _linear_tile(pid, pid_s, A, B, C, BIAS, PRE_IN, PRE_OUT, WS, ROWSUM, a_desc, b_desc,
                 M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 stride_pim, stride_pik, stride_pom, stride_pon, stride_bias,
                 HAS_BIAS: tl.constexpr, BIAS_ALONG_M: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
                 EPILOGUE_ACT: tl.constexpr, STORE_PRE: tl.constexpr, ROW_SUM: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, TMA: tl.constexpr, A_T: tl.constexpr,
                 B_T: tl.constexpr, GUARD_K_LOOP: tl.constexpr):
    """Output tile ``pid`` (in grouped order) of split ``pid_s``: ``linear_kernel``'s main loop and epilogue
    (the kernel's arguments; ``a_desc`` / ``b_desc`` its TMA descriptors, None for pointer tiles).
    ``GUARD_K_LOOP``: the K loop behind an explicit ``n_k > 0`` (see there; the ordinary grid, not the
    persistent loop)."""
    ACC_DTYPE: tl.constexpr = tl.float64 if A.dtype.element_ty == tl.float64 else tl.float32

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M rows of tiles share the same B columns while they are in L2.
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    # Operand rows/columns past M/N wrap around to valid ones (their products land in rows and columns
    # the epilogue does not store), so the loop's loads need no row or column mask. Wrapped in int32
    # (M, N < 2^31), widened to int64 before they multiply a stride: offset * stride may pass 2^31.
    offs_am = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_bn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    # This split's share of the reduction, whole BLOCK_K steps: [k_lo, k_lo + k_len).
    if SPLIT_K == 1:
        k_lo = 0  # a compile-time 0: no runtime base offset on the operand pointers
        k_len = K
    else:
        k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = pid_s * k_chunk
        k_len = tl.maximum(tl.minimum(K - k_lo, k_chunk), 0)  # the last splits may be empty

    if not TMA:
        a_ptrs = A + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
        b_ptrs = B + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    if PROLOGUE_ACT is not None:
        p_ptrs = PRE_IN + (offs_am[:, None] * stride_pim + offs_k[None, :] * stride_pik)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # Row sums (db): for 16-bit operands on the tensor cores, as A @ E with E = [1, 0, ..., 0] in 16
    # columns (the narrowest tl.dot): one N = 16 MMA per step instead of a cross-thread reduction of the
    # A tile in every iteration (which doubled the loop's instructions at 128x256). Products with 1 and 0
    # are exact; the sum is an MMA's fp32 accumulation. fp32 and fp64 reduce each A tile as before (tf32
    # would round A; an fp32 "ieee" or fp64 dot costs 16 FMAs per element).
    ROW_SUM_MMA: tl.constexpr = ROW_SUM and (A.dtype.element_ty == tl.float16
                                             or A.dtype.element_ty == tl.bfloat16)
    if ROW_SUM_MMA:
        row_sum = tl.zeros((BLOCK_M, 16), dtype=ACC_DTYPE)
        e0 = ((tl.zeros((BLOCK_K, 16), tl.int32) + tl.arange(0, 16)[None, :]) == 0).to(A.dtype.element_ty)
    else:
        row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    n_k = tl.cdiv(k_len, BLOCK_K)
    # The K loop behind an explicit n_k > 0 where wgmma may run: without it, the path that skips a zero-trip
    # loop hands the accumulator's zeros to the loop's final wgmma wait, and ptxas 12.8 (Triton 3.6, the
    # H100 machines') serialises every wgmma of the loop (C7515). Not for fp64 (DMMA/FMA, no wgmma), where
    # the branch only cost registers (8 bytes of stack for one sm_90 dW tile under 3.6), nor in the
    # persistent loop, which ptxas did not serialise and where the branch cost 80 bytes of stack (128x128x64
    # with gelu, Triton 3.9).
    GUARD: tl.constexpr = GUARD_K_LOOP and A.dtype.element_ty != tl.float64
    go = n_k > 0 if GUARD else True
    if go:
        if GUARD:
            tl.assume(n_k > 0)
        for step in range(0, n_k):
            k_left = k_len - step * BLOCK_K
            k = tl.cast(k_lo + step * BLOCK_K, tl.int64)
            if TMA:
                a = _load_box(a_desc, pid_m * BLOCK_M, k_lo + step * BLOCK_K, A_T)
            else:
                a = _load_k_step(a_ptrs + k * stride_ak, offs_k, k_left, 1, EVEN_K)
            if PROLOGUE_ACT is not None:
                pre = _load_k_step(p_ptrs + k * stride_pik, offs_k, k_left, 1, EVEN_K)
                # Rounded back to the operand dtype, as the unfused path's elementwise kernel would store it.
                a = (a.to(ACC_DTYPE) * activation_grad(pre.to(ACC_DTYPE), PROLOGUE_ACT)).to(A.dtype.element_ty)
            if ROW_SUM_MMA:
                row_sum = tl.dot(a, e0, row_sum, out_dtype=ACC_DTYPE)
            elif ROW_SUM:
                row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
            if TMA:
                b = _load_box(b_desc, k_lo + step * BLOCK_K, pid_n * BLOCK_N, B_T)
            else:
                b = _load_k_step(b_ptrs + k * stride_bk, offs_k, k_left, 0, EVEN_K)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if ROW_SUM_MMA:
        row_sum = tl.sum(row_sum, axis=1)  # column 0 plus zeros: exact
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT_K == 1:
        _bias_act_store(acc, C, BIAS, PRE_OUT, offs_m, offs_n, M, N,
                        stride_cm, stride_cn, stride_pom, stride_pon, stride_bias, HAS_BIAS, BIAS_ALONG_M, EPILOGUE_ACT,
                        STORE_PRE)
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
    HAS_BIAS: tl.constexpr, BIAS_ALONG_M: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    SPLIT_K: tl.constexpr,
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
                    stride_cm, stride_cn, stride_pom, stride_pon, stride_bias, HAS_BIAS, BIAS_ALONG_M, ACTIVATION,
                    STORE_PRE)
