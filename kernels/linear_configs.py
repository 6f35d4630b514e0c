"""Tile policy of the fused linear kernels (``kernels/linear.py``): what the autotuner may try, and when.

- :data:`TILES`: every matmul tile the autotuner may time, as :class:`Tile` records;
  :func:`get_linear_configs` turns them into ``triton.Config`` s.
- :func:`keep`: whether a tile suits a launch (shared memory, wgmma rows, a per-thread register
  estimate); :func:`prune`: the configs one launch may time, what the launcher's autotuner and the AOT
  report (``python -m gradkernels.aot``) both call.
- :func:`choose_split`: how far to split the reduction; :func:`bucket`: the autotune key of M.
- The fixed tiles of the interpreter and of the split-K reduce kernel.

Nothing here is device code; the architecture limits come from ``kernels/arch.py``. How the rules were
calibrated on the AOT report is in bench/GPU.md ("Linear").
"""

from __future__ import annotations

import dataclasses
import math

import triton

from .arch import DEFAULT_ARCH, calibrated, limits, matmul_path, tma_supported


@dataclasses.dataclass(frozen=True)
class Tile:
    """One matmul config: output tile ``block_m x block_n``, reduction step ``block_k``, ``group_m`` rows of
    tiles per L2 group, warps, pipeline stages, and an optional register cap (PTX ``.maxnreg``). ``tma``:
    A and B come through TMA tensor descriptors (``TMA`` of ``linear_kernel``; sm_90+, 16-bit, where the
    launch's operands allow it: :func:`tma_layout`). ``persistent`` (TMA tiles only): one program per SM
    walks the output tiles (``PERSISTENT``; the launcher's grid)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    maxnreg: int | None = None
    tma: bool = False
    persistent: bool = False

    def __post_init__(self):
        if self.persistent and not self.tma:
            raise ValueError("persistent tiles read through TMA (tma=True)")

    def config(self) -> triton.Config:
        kwargs = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m}
        if self.tma:  # absent otherwise: a plain config launches the kernel's default (TMA = False)
            kwargs["TMA"] = True
        if self.persistent:
            kwargs["PERSISTENT"] = True
        return triton.Config(kwargs, num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)


TILES = (
    # TMA tiles (sm_90, fp16/bf16, operands with a contiguous dimension and 16-byte aligned strides): the
    # largest tiles of the list below, and further down twins of the 64-row and skinny tiles that decoding
    # sizes keep, their operands fetched by the TMA unit instead of per-thread cp.async addresses (no
    # address registers or index arithmetic in the loop, no K mask: boxes past the end read zeros). A TMA
    # tile comes before its pointer twin: the report's "picked" breaks ties by list order.
    Tile(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, tma=True),
    # Persistent twins: the next tile's first loads overlap this one's epilogue (bench/GPU.md, "TMA tiles
    # of the linear kernel").
    Tile(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, tma=True, persistent=True),
    Tile(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, tma=True, persistent=True),
    Tile(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    Tile(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
    Tile(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
    Tile(block_m=128, block_n=128, block_k=32, num_warps=4, num_stages=4),
    Tile(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4),
    Tile(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, tma=True),
    Tile(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    Tile(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
    Tile(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3),
    Tile(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=3),
    # Skinny outputs: decoding's few tokens in the columns of a swapped launch (swap_operands), narrow
    # layers. One warp group's wgmma has 64 rows and takes 8-256 columns, so 16 or 32 columns keep
    # each instruction full; a long K step amortises the loop over the thin tile.
    Tile(block_m=128, block_n=32, block_k=128, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=128, block_n=32, block_k=128, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=32, block_k=128, num_warps=4, num_stages=4),
    Tile(block_m=128, block_n=16, block_k=128, num_warps=4, num_stages=4, tma=True),
    Tile(block_m=128, block_n=16, block_k=128, num_warps=4, num_stages=4),
    Tile(block_m=64, block_n=16, block_k=128, num_warps=4, num_stages=4),
    # Last: the only tile keep() accepts for fp64 with a fused activation derivative (whose erf alone
    # takes most of the registers), and prune()'s fallback when it accepts none: 16 rows, the least
    # tl.dot takes. maxnreg=255 because ptxas otherwise caps registers to fit more blocks per SM and
    # spills a few bytes.
    Tile(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=3, maxnreg=255),
)

# Under TRITON_INTERPRET=1 autotuning cannot run (it times configs on a GPU): one pinned config.
# Small enough that test shapes such as 97 or 257 span several tiles and exercise the masks.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}



def even_k(k: int) -> bool:
    """Whether a reduction of length ``k`` is a whole number of steps for every ``BLOCK_K`` the launch may
    use (the tiles above and the interpreter's): the kernel's ``EVEN_K``, which drops the K mask from the
    loop. A launcher-side flag, not a config one: the autotuner's key would otherwise have to carry K."""
    return k % _K_MULTIPLE == 0


_K_MULTIPLE = math.lcm(*(t.block_k for t in TILES), INTERPRETER_CONFIG["BLOCK_K"])

# Tiles of the split-K reduce kernel (memory bound: wide rows for coalescing).
REDUCE_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 128}
REDUCE_WARPS = 4

# Per-thread register budgets of keep()'s estimate, by calibrated architecture and matmul path
# (kernels/arch.py::matmul_path): the largest that leave no spilling config in the AOT report.
# sm_90 "fma32" (fp32 with input_precision="ieee"): 159, since the EVEN_K loop the 64x64x64/4-warp tile
# (estimate 160) spills 8-16 bytes in plain forward and dW launches; the estimate is not monotonic there
# (64x32x128 at 208 compiled clean), so the budget is the cautious side of the smallest spilling tile.
_REGISTER_BUDGET = {80: {"tc16": 160, "tc32": 48, "fma32": 96, "fma64": 160},
                    90: {"tc16": 192, "tc32": 192, "fma32": 159, "fma64": 160}}


def get_linear_configs():
    """Every config the matmul autotuner may try (before :func:`prune`), in :data:`TILES` order."""
    return [t.config() for t in TILES]


def matmul_smem_bytes(block_m, block_n, block_k, num_stages, dtype_bytes):
    """Shared memory the software pipeline needs: one A and one B tile per stage."""
    return (block_m * block_k + block_k * block_n) * dtype_bytes * num_stages


def keep(config, dtype_bytes, arch=DEFAULT_ARCH, flags=None):
    """Whether a matmul config suits a launch on ``arch`` with operands of ``dtype_bytes`` bytes.

    - the pipeline buffers fit the architecture's shared memory per block;
    - on sm_90, tensor-core tiles have 64 rows per warp group (smaller ones fall back from wgmma to
      mma.sync);
    - the tiles a program keeps in registers fit a per-thread budget. Estimated in 32-bit words per
      thread: the accumulator; the operand fragments where they live in registers (twice, on the FMA
      path of fp64 / fp32 "ieee"; (A + B) x bytes / 8 through sm_80's mma.sync; wgmma reads them from
      shared memory); what a fused activation keeps live: its derivative in the prologue about four A
      tiles besides one accumulator, an epilogue activation one accumulator, the bias-gradient row sums
      of dW half of one. The budgets are not register counts: they are fitted to what compiled without
      spills, where ptxas also trades registers for occupancy.

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
    if kw.get("TMA") and (dtype_bytes != 2 or not tma_supported(arch)):
        return False
    # Persistent tiles not with the bias gradient's row sums: Triton 3.6's loop flattening
    # (TritonGPUFuseNestedLoops) fails to compile that loop ("scf.if ... source has 2 operands, but target
    # successor needs 4"); 3.9 compiles it.
    if kw.get("PERSISTENT") and flags.get("ROW_SUM"):
        return False
    if matmul_smem_bytes(bm, bn, bk, config.num_stages, dtype_bytes) > limits(arch).smem_per_block:
        return False
    path = matmul_path(dtype_bytes, flags.get("INPUT_PRECISION"))
    fma = path.startswith("fma")
    if arch >= 90 and not fma and bm < 16 * warps:
        return False
    threads = 32 * warps
    wide = 2 if dtype_bytes == 8 else 1  # fp64 values take two registers
    acc = bm * bn * wide / threads
    a_tile = bm * bk * wide / threads
    b_tile = bk * bn * wide / threads
    words = acc
    # Operands loaded element by element keep a 64-bit address per element in the loop (not through TMA:
    # the descriptor reads any row stride that is a multiple of 16 bytes).
    if not kw.get("TMA"):
        a_each, b_each = elementwise_operands(flags, path, arch)
        words += ADDRESS_WORDS * (a_each * bm * bk + b_each * bk * bn) / threads
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
    return words <= _REGISTER_BUDGET[calibrated(arch)][path]


# A kept tile has more than this fraction of its rows and of its columns filled at the key's sizes, so
# more than half of each tensor-core instruction multiplies data. Tiles and bucketed token counts are
# powers of two, so "more than half at the bucket" means "the tile is no taller than the bucket", which
# keeps more than half filled for every token count of the bucket (it holds more than half the bucket).
MIN_FILL = 0.5


def fill(config, m, n):
    """The fraction of the output tiles' rows and of their columns that an ``m x n`` output fills, the
    smaller of the two: the share of each tensor-core instruction (wgmma: 64 rows per warp group and
    BLOCK_N columns; mma.sync: 16 x 8) doing useful work."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return min(m / (triton.cdiv(m, bm) * bm), n / (triton.cdiv(n, bn) * bn))


ADDRESS_WORDS = 1.5

def elementwise_operands(args, path, arch):
    """``(A, B)``: whether the launch loads each operand element by element rather than in 16-byte
    vectors: when no stride is 1, when the other stride is not a multiple of 16 elements or the tensor
    not 16-byte aligned (Triton only knows those divisibilities), and on sm_90's tf32 path when the
    operand is not K-contiguous (wgmma reads tf32 operands K-major from shared memory: dW's A = dY^T and
    B = X, dX's B = W). Unknown strides (``args`` without them) count as vector loads."""
    def each(tensor, stride_k, stride_mn):
        if stride_k is None or stride_mn is None:
            return False
        if path == "tc32" and arch >= 90 and stride_k != 1:
            return True
        other = stride_mn if stride_k == 1 else stride_k if stride_mn == 1 else None
        aligned = getattr(tensor, "aligned", None)
        if aligned is None and hasattr(tensor, "data_ptr") and getattr(tensor, "device", None) is not None:
            aligned = tensor.device.type == "meta" or tensor.data_ptr() % 16 == 0
        return other is None or other % 16 != 0 or aligned is False

    return (each(args.get("A"), args.get("stride_ak"), args.get("stride_am")),
            each(args.get("B"), args.get("stride_bk"), args.get("stride_bn")))


def prune(configs, args, *, dtype_bytes, arch):
    """The configs the autotuner may time for one launch of ``linear_kernel``.

    Those :func:`keep` accepts for the launch's flags (TMA tiles only where the launch's ``TMA_OK`` says its
    operands allow them, :func:`tma_layout`) whose tiles the output fills to more than
    :data:`MIN_FILL` (:func:`fill`, on the sizes of the autotune key ``M_KEY`` x ``N_KEY``), without the
    tiles under 64 rows or columns where the output has 64 or more (unless only those fill it); when
    keep() accepts some but none fills that far, the best-filled of them; when it accepts none, the last
    config (the fallback tile). Called by the launcher's autotuner (``early_config_prune``) and by the AOT report.

    Args:
        configs: the autotuner's list (:func:`get_linear_configs`).
        args: the launch's arguments by kernel parameter name; the constexpr flags are read
            (``PROLOGUE_ACT``, ``EPILOGUE_ACT``, ``ROW_SUM``, ``INPUT_PRECISION``) and the sizes of the key
            (``M_KEY``, ``N_KEY``; without them no tile is dropped for its fill), the rest ignored.
        dtype_bytes: element size of the operands.
        arch: compute capability of the launch's device as an int.

    Returns:
        The kept configs, in list order (never empty).
    """
    kept = [c for c in configs
            if keep(c, dtype_bytes, arch, flags=args) and (args.get("TMA_OK") or not c.kwargs.get("TMA"))]
    m, n = args.get("M_KEY"), args.get("N_KEY")
    if kept and m and n:
        filled = [c for c in kept if fill(c, m, n) > MIN_FILL]
        best = max(fill(c, m, n) for c in kept)
        kept = ([c for c in filled if not _thin(c, m, n)] or filled
                or [c for c in kept if fill(c, m, n) == best])
    return kept or configs[-1:]


def _thin(config, m, n):
    """A tile under 64 rows (columns) for an output of 64 or more: it rereads the other operand more
    often than a 64-wide tile would, and on sm_90 runs on mma.sync (wgmma has 64 rows per warp group).
    The skinny tiles are for skinny outputs; prune() keeps them for larger ones only when nothing else fits."""
    return (config.kwargs["BLOCK_M"] < 64 <= m) or (config.kwargs["BLOCK_N"] < 64 <= n)


def tma_layout(a, b):
    """``(ok, a_t, b_t)``: whether the operands ``a`` (M, K) and ``b`` (K, N) of a launch can be read through
    TMA descriptors, and over which orientation (``A_T`` / ``B_T`` of ``linear_kernel``). Each must be
    16-bit (the TMA tiles are calibrated for those) and 2-D with one stride 1 and the other a multiple of
    16 bytes, on a 16-byte aligned address (TMA's rules); ``a_t`` when ``a``'s row stride is the 1 (the
    descriptor is over a^T), ``b_t`` when ``b``'s K stride is (over b^T). The forward's W^T is ``b_t``, the
    dW launch's dY^T ``a_t``."""
    def transposed(t):
        """False (over t), True (over t^T), or None (no TMA)."""
        size = t.element_size()
        if size != 2 or t.dim() != 2:
            return None
        # A meta tensor has no address: its offset into a (16-byte aligned) allocation stands for one.
        address = t.storage_offset() * size if t.device.type == "meta" else t.data_ptr()
        if address % 16:
            return None
        for flip, (inner, outer) in ((False, (t.stride(1), t.stride(0))), (True, (t.stride(0), t.stride(1)))):
            if inner == 1 and outer * size % 16 == 0 and outer > 0:
                return flip
        return None

    a_t, b_t = transposed(a), transposed(b)
    if a_t is None or b_t is None:
        return False, False, False
    return True, a_t, b_t


# Swapped launches: at most this many output rows (tokens) go to the columns instead.
SWAP_MAX_M = 32


def swap_operands(m, n):
    """Whether to compute ``C = A @ B`` as ``C^T = B^T @ A^T``: when C has few rows (a decoding step's
    tokens) and enough columns. sm_90's wgmma computes 64 rows per warp group, so 16 rows would use a
    quarter of each instruction; swapped, the columns (the layer's features) fill the 64 rows and the
    tokens become the instruction's N (8 to 256)."""
    return m <= SWAP_MAX_M and n >= 64


def autotune_keys(m, n, k, tokens):
    """``(M_KEY, N_KEY, K_KEY)``: the sizes the autotuner keys on and the prune sees. The dimension that
    counts tokens (``tokens``: "m", "n" or "k") is bucketed (:func:`bucket`), so a new batch size
    neither retunes nor recompiles; the feature dimensions are exact (fixed per layer)."""
    sizes = {"m": m, "n": n, "k": k}
    if tokens not in sizes:
        raise ValueError(f"tokens must be 'm', 'n' or 'k', got {tokens!r}")
    sizes[tokens] = bucket(sizes[tokens])
    return sizes["m"], sizes["n"], sizes["k"]


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
