"""Tile policy of the attention kernels (``kernels/attention.py``): what each autotuner may try, and when.

- :data:`FWD_TILES`, :data:`DKDV_TILES`, :data:`DQ_TILES`: the tiles the autotuners may time, as
  :class:`Tile` records; :func:`get_attn_fwd_configs` / :func:`get_attn_bwd_configs` turn them into
  ``triton.Config`` s.
- :func:`keep`: whether a tile compiled clean for a launch's key in the generated table
  ``kernels/attention_tiles.py`` (and fits shared memory on uncalibrated parts); :func:`prune`: the
  configs one launch may time, what the launchers' autotuners and the AOT report both call.
- The launch rules at head dims above 128 (:func:`wide_heads`): dK and dV in two launches,
  :func:`backward_precision`, :func:`tile_variant`.
- TMA tiles (Hopper tensor descriptors, all three kernels): ``arch.tma_supported`` (architecture and
  Triton) and :func:`tma_compatible` (a launch's tensors) decide where they may run.
- :func:`seqlen_bucket` (autotune keys), :func:`head_block` (``BLOCK_D``), :func:`preprocess_config`,
  :func:`hopeless` (what the AOT calibration runs skip), and the interpreter's pinned tiles.

Nothing here is device code; the architecture limits come from ``kernels/arch.py``. How the tile lists
and the table were arrived at is in bench/GPU.md ("Attention").
"""

from __future__ import annotations

import dataclasses

import triton

from .arch import CALIBRATED, DEFAULT_ARCH, calibrated, limits, matmul_path, tma_supported
from .attention_tiles import CLEAN_TILES


@dataclasses.dataclass(frozen=True)
class Tile:
    """One attention config. Forward and dQ: ``block_m`` query rows per program, looping over
    ``block_n`` keys; dK/dV: ``block_n`` keys per program, looping over ``block_m`` query rows. Warps,
    pipeline stages and an optional register cap (PTX ``.maxnreg``). ``tma``: the forward reads K and V
    through TMA tensor descriptors (``TMA`` of ``attn_fwd_kernel``; sm_90+, 16-bit, see :func:`tma_supported`).

    The first five fields in this order (:meth:`key`) are the tuples of ``attention_tiles.CLEAN_TILES``;
    TMA tiles are listed under their own variant (:func:`tile_variant`).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None
    tma: bool = False

    def config(self) -> triton.Config:
        kwargs = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if self.tma:  # absent otherwise: a plain config launches the kernel's default (TMA = False)
            kwargs["TMA"] = True
        return triton.Config(kwargs, num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def key(self) -> tuple:
        """The tile's tuple in ``CLEAN_TILES``: ``(block_m, block_n, num_warps, num_stages, maxnreg)``."""
        return (self.block_m, self.block_n, self.num_warps, self.num_stages, self.maxnreg)

    @classmethod
    def of(cls, config) -> "Tile":
        """The tile of a ``triton.Config`` made by :meth:`config`."""
        return cls(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages,
                   getattr(config, "maxnreg", None), bool(config.kwargs.get("TMA", False)))


# Each list holds general tiles (16-row ones for short query blocks), wide 8-warp tiles for D = 256, small
# tiles on 8 and 16 warps for the FMA paths (fp32 "ieee", fp64), and maxnreg variants where ptxas otherwise
# aims at occupancy and spills. Order matters only for ties: prune() sorts by area, stably.
FWD_TILES = (
    # TMA tiles (sm_90, fp16/bf16, plain launches): K/V addresses leave the registers, so 128-key blocks
    # (wgmma N = 128) fit beside the 128 x D accumulator.
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=128, block_n=64, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=128, block_n=64, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=64, block_n=128, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=64, block_n=128, num_warps=4, num_stages=2, tma=True),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=3),
    Tile(block_m=128, block_n=64, num_warps=8, num_stages=3),
    Tile(block_m=128, block_n=64, num_warps=4, num_stages=3),
    Tile(block_m=128, block_n=32, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=128, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=2),
    Tile(block_m=64, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=32, block_n=64, num_warps=4, num_stages=2),
    Tile(block_m=32, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=64, num_warps=4, num_stages=3),  # decoding: a few query rows
    Tile(block_m=16, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=32, num_warps=4, num_stages=1),  # D = 256, fp32/fp64, ~100 KB parts
    Tile(block_m=16, block_n=16, num_warps=4, num_stages=1),
    Tile(block_m=128, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=64, block_n=16, num_warps=4, num_stages=2),
    Tile(block_m=64, block_n=32, num_warps=4, num_stages=1),
    Tile(block_m=128, block_n=16, num_warps=8, num_stages=2),
    Tile(block_m=32, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=32, block_n=16, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=1),
    Tile(block_m=16, block_n=16, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=1),
    Tile(block_m=32, block_n=16, num_warps=8, num_stages=2, maxnreg=255),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=1, maxnreg=255),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=1, maxnreg=128),
    Tile(block_m=64, block_n=16, num_warps=8, num_stages=2),
    Tile(block_m=128, block_n=16, num_warps=8, num_stages=1),
)
DKDV_TILES = (
    # TMA tiles (sm_90, fp16/bf16, plain launches): K and V held in shared memory, Q and dO streamed. Those
    # with block_m >= block_n compute the scores as (queries x keys) (kernels/attention_dkdv.py).
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=128, block_n=64, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=64, block_n=128, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=64, block_n=128, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=32, block_n=128, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=32, block_n=128, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=32, block_n=64, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=64, block_n=128, num_warps=8, num_stages=3),
    Tile(block_m=32, block_n=128, num_warps=8, num_stages=3),
    Tile(block_m=32, block_n=128, num_warps=8, num_stages=2),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=3),
    Tile(block_m=32, block_n=64, num_warps=4, num_stages=3),
    Tile(block_m=32, block_n=64, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=64, num_warps=4, num_stages=2),
    Tile(block_m=32, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=4, num_stages=1),
    Tile(block_m=16, block_n=128, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=64, num_warps=4, num_stages=1),
    Tile(block_m=32, block_n=64, num_warps=4, num_stages=1),
    Tile(block_m=16, block_n=128, num_warps=8, num_stages=1),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=1),
    Tile(block_m=16, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=32, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=1),
    Tile(block_m=16, block_n=64, num_warps=8, num_stages=2),
    Tile(block_m=32, block_n=64, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=64, num_warps=8, num_stages=1),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=1, maxnreg=128),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=2, maxnreg=128),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=2, maxnreg=255),
    Tile(block_m=16, block_n=64, num_warps=8, num_stages=2, maxnreg=255),
)
DQ_TILES = (
    # TMA tiles (sm_90, fp16/bf16, plain launches): Q and dO held in shared memory, K and V streamed.
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=128, block_n=128, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=64, block_n=128, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=64, block_n=128, num_warps=4, num_stages=2, tma=True),
    Tile(block_m=128, block_n=64, num_warps=8, num_stages=3, tma=True),
    Tile(block_m=128, block_n=64, num_warps=8, num_stages=2, tma=True),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=3, tma=True),
    Tile(block_m=128, block_n=64, num_warps=8, num_stages=3),
    Tile(block_m=128, block_n=32, num_warps=8, num_stages=3),
    Tile(block_m=128, block_n=32, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=64, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=64, num_warps=8, num_stages=2),
    Tile(block_m=64, block_n=32, num_warps=4, num_stages=3),
    Tile(block_m=64, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=32, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=32, num_warps=4, num_stages=2),
    Tile(block_m=16, block_n=32, num_warps=4, num_stages=1),
    Tile(block_m=16, block_n=16, num_warps=4, num_stages=1),
    Tile(block_m=64, block_n=16, num_warps=4, num_stages=2),
    Tile(block_m=128, block_n=16, num_warps=8, num_stages=2),
    Tile(block_m=64, block_n=32, num_warps=4, num_stages=1),
    Tile(block_m=128, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=1),
    Tile(block_m=32, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=32, block_n=16, num_warps=8, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=1),
    Tile(block_m=32, block_n=16, num_warps=16, num_stages=2),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=1, maxnreg=255),
    Tile(block_m=16, block_n=32, num_warps=8, num_stages=2, maxnreg=255),
    Tile(block_m=32, block_n=16, num_warps=8, num_stages=2, maxnreg=255),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=1, maxnreg=128),
    Tile(block_m=16, block_n=16, num_warps=16, num_stages=2, maxnreg=128),
    Tile(block_m=16, block_n=16, num_warps=8, num_stages=2, maxnreg=255),
    Tile(block_m=64, block_n=16, num_warps=8, num_stages=2),
    Tile(block_m=64, block_n=32, num_warps=8, num_stages=2),
    Tile(block_m=64, block_n=16, num_warps=8, num_stages=1),
    Tile(block_m=128, block_n=16, num_warps=8, num_stages=1),
)

# The Delta preprocess is memory bound: not tuned, a wide tile (see preprocess_config).
PREPROCESS_WARPS = 4
# Rows of the padded row-statistics buffer are a multiple of this (every dK/dV BLOCK_M and preprocess
# BLOCK_M divides it): the TMA dK/dV loop reads it without masks.
ROW_STATS_ALIGN = 128


@triton.constexpr_function
def do_row_width(head_dv):
    """Elements per row of the preprocess's dO' buffer: ``head_dv`` rounded up to 8 (16-byte rows for a
    TMA descriptor). One formula for the launcher that allocates it and the kernels that index it."""
    return (head_dv + 7) // 8 * 8

# Under TRITON_INTERPRET=1 autotuning cannot run (it times configs on a GPU): one pinned config per
# kernel. 32x32 tiles, so test lengths such as 37, 97 or 257 span several blocks and every mask path.
INTERPRETER_FWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
INTERPRETER_BWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
INTERPRETER_PREPROCESS_CONFIG = {"BLOCK_M": 32}

MAX_TUNED = 6  # configs one autotuner call times at most
KERNELS = ("fwd", "dkdv", "dq")


def get_attn_fwd_configs():
    """Every config the forward autotuner may try (before :func:`prune`)."""
    return [t.config() for t in FWD_TILES]


def get_attn_bwd_configs():
    """Configs the backward autotuners may try, by kernel: ``{"dkdv": [...], "dq": [...]}``.

    The preprocess kernel is not tuned (:func:`preprocess_config`).
    """
    return {"dkdv": [t.config() for t in DKDV_TILES], "dq": [t.config() for t in DQ_TILES]}


def _check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'fwd', 'dkdv' or 'dq', got {kernel!r}")


# The largest head dim (D and Dv) the kernels take: head_block() tiles up to 256 are the ones the tile lists
# and the AOT report cover.
MAX_HEAD_DIM = 256


def head_block(head_dim):
    """``BLOCK_D``: the power-of-two tile covering a head dim (>= 16, the smallest ``tl.dot`` K)."""
    return triton.next_power_of_2(max(int(head_dim), 16))


def seqlen_bucket(n):
    """Autotune key of a sequence length: the next power of two (>= 16).

    Every length in (2^(k-1), 2^k] shares one tuned config, so a new length neither retunes nor
    recompiles (the kernel itself takes lengths as runtime integers).
    """
    return triton.next_power_of_2(max(int(n), 16))


def preprocess_config(head_dim_v, dtype_bytes):
    """Tiles of the Delta preprocess on a GPU: 64 rows, fewer where the O and dO tiles would not fit in
    registers (16 KB of each per 4-warp program at most: 32 rows for fp64 at Dv = 256)."""
    return {"BLOCK_M": max(16, min(64, 65536 // (head_block(head_dim_v) * int(dtype_bytes))))}


# Decoding (attention_decode.py): query lengths up to DECODE_MAX_LQ take the split-KV kernel with GQA packing.
DECODE_MAX_LQ = 16
DECODE_MIN_KEYS = 256  # keys per split at least: a split's partial costs a round trip through memory
DECODE_MAX_SPLITS = 128
DECODE_COMBINE_WARPS = 4


def use_decode(lq):
    """Whether a plain forward of ``lq`` query rows runs the decoding kernels (``attention_decode.py``)."""
    return 1 <= int(lq) <= DECODE_MAX_LQ


def decode_config(rows, head_dim, head_dim_v, dtype_bytes, input_precision=None):
    """The decoding kernel's fixed tile for ``rows = GROUP * Lq`` packed rows per kv head; ``input_precision``
    the launch's (:func:`backward_precision`'s: tf32 runs in "ieee" above D = 128, as in the backward).

    ``BLOCK_M`` (the packed rows, the MMAs' N) is the rows rounded up to a power of two, at least 16
    (``tl.dot``'s minimum), at most 32 for 16-bit operands up to D = 128 and 16 otherwise; more rows take
    more row blocks (which read the same K/V blocks side by side, through the L2). ``BLOCK_N`` (keys, the
    MMAs' M) is 64 on the tensor-core paths, Hopper's wgmma M. The FMA paths (fp32 "ieee", fp64) hold
    every product in registers: 32 keys up to D = 64, 16 above (4 warps, 1 stage at D = 128). Each rule is what compiled clean for
    sm_80 and sm_90 under both Triton 3.9 and 3.6 (``make aot-check`` / ``make aot-check-triton36``
    compile every combination the catalogue's decode cases launch: 64 rows on 8 warps spill 16 B under
    3.6 at D = 128, so 32). The loop is memory bound: the split count, not the tile, is what fills the GPU.
    """
    block_d = max(head_block(head_dim), head_block(head_dim_v))
    path = matmul_path(dtype_bytes, input_precision)
    if path == "tc16":
        max_rows, block_n, warps = (32 if block_d <= 128 else 16), 64, 4
    elif path == "tc32":
        max_rows, block_n, warps = 16, 64, 8
    else:
        max_rows, block_n = 16, (32 if block_d <= 64 else 16)
        warps = 4 if block_d == 128 else 8  # 8 warps at D = 128: ptxas caps them at 64 registers and spills
    block_m = min(max_rows, max(16, triton.next_power_of_2(int(rows))))
    stages = 1 if path != "tc16" and path != "tc32" and block_d == 128 else 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def decode_combine_rows(head_dim_v, acc_bytes):
    """``BLOCK_R`` of the combine kernel: packed rows per program, so that the running and the loaded
    partial output (two ``BLOCK_R x BLOCK_DV`` accumulator tiles) stay within registers: 8 KiB each."""
    return max(1, min(16, 8192 // (head_block(head_dim_v) * int(acc_bytes))))


def decode_splits(lk, programs, block_n, num_sms):
    """``(num_splits, keys_per_split)`` of a decoding launch whose ``programs = B * Hkv * row blocks``
    would otherwise each stream all ``lk`` keys: enough splits for two programs per SM, each of at least
    :data:`DECODE_MIN_KEYS` keys (a multiple of ``block_n``), at most :data:`DECODE_MAX_SPLITS`. One split
    when the programs fill the GPU already. A function of the shape and the SM count only (so a launch
    is reproducible bit for bit on one kind of GPU)."""
    lk, programs = int(lk), max(1, int(programs))
    want = min(triton.cdiv(2 * int(num_sms), programs), max(1, lk // DECODE_MIN_KEYS), DECODE_MAX_SPLITS)
    return split_keys(lk, want, block_n)


def split_keys(lk, splits, block_n):
    """``(num_splits, keys_per_split)``: ``lk`` keys in at most ``splits`` chunks of a whole number of
    ``block_n`` blocks (fewer chunks when ``splits`` exceeds the blocks)."""
    lk = max(int(lk), 1)
    per = triton.cdiv(triton.cdiv(lk, max(1, int(splits))), block_n) * block_n
    return triton.cdiv(lk, per), per


def wide_heads(head_dim, head_dim_v):
    """Whether a launch's head-dim block is 256 (D or Dv above 128), where the backward launches differ.

    - dK and dV come from two launches of the dK/dV kernel, one accumulator each: two accumulators
      beside the K and V tiles leave no tile that compiles without spills on sm_90, one per launch
      leaves some. The second launch recomputes P (about a third more backward work at these head dims).
    - :func:`backward_precision` turns tf32 into "ieee"; :func:`tile_variant` names the single-gradient
      dK/dV launches.
    """
    return max(head_block(head_dim), head_block(head_dim_v)) > 128


def backward_precision(input_precision, head_dim, head_dim_v):
    """``INPUT_PRECISION`` of the backward kernels and of the decoding kernel: the forward's, except that tf32 becomes "ieee" (full
    fp32, FMA) at head dims above 128, where no tf32 tile of the dK and dQ kernels compiles for sm_90
    without spilling. More precise than asked, never less."""
    if input_precision == "tf32" and wide_heads(head_dim, head_dim_v):
        return "ieee"
    return input_precision


# The kernels' feature flags (window, softcap, ALiBi, dropout, varlen): a launch with any of them compiles
# to more code than a plain one, and its clean tiles are listed under their own variant.
FEATURE_FLAGS = ("IS_VARLEN", "HAS_LEFT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT")


def has_features(args):
    """Whether a launch's arguments (kernel parameter name -> value) turn on any feature flag."""
    return any(bool(args.get(flag)) for flag in FEATURE_FLAGS)


def tile_variant(kernel, head_dim, head_dim_v, compute_dk=True, compute_dv=True, features=False, tma=False):
    """The key of ``CLEAN_TILES`` a launch is checked under: "fwd", "dq", "dkdv" or, for dK/dV launches
    with one accumulator at head dims above 128 (:func:`wide_heads`), "dkdv_dk" / "dkdv_dv"; with
    ``features`` (:func:`has_features`) the same name + "_features" (those launches spill with more tiles,
    which must not shrink the plain launches' list); a TMA tile (``tma``) the name + "_tma" (other code)."""
    _check_kernel(kernel)
    variant = kernel
    if kernel == "dkdv" and wide_heads(head_dim, head_dim_v) and not (compute_dk and compute_dv):
        variant = "dkdv_dk" if compute_dk else "dkdv_dv"
    if features:
        variant += "_features"
    return variant + "_tma" if tma else variant


# The kernels that have TMA tiles (all three; Hopper's TMA unit, see arch.tma_supported).
TMA_KERNELS = ("fwd", "dkdv", "dq")


def tma_compatible(*tensors):
    """Whether K and V can be read through TMA descriptors: 16-bit elements (the TMA tiles are calibrated
    for those), head dims from 8 (16-byte rows) to 128, the last dimension contiguous, and every other stride
    and the base address multiples of 16 bytes (TMA's rules; each (batch, head) plane is one descriptor)."""
    for t in tensors:
        size = t.element_size()
        if size != 2 or t.shape[-1] * size < 16 or head_block(t.shape[-1]) > 128 or t.stride(-1) != 1:
            return False
        if any(st * size % 16 for st in t.stride()[:-1]):
            return False
        # A meta tensor has no address: its offset into a (16-byte aligned) allocation stands for one.
        address = t.storage_offset() * size if t.device.type == "meta" else t.data_ptr()
        if address % 16:
            return False
    return True


def attn_smem_bytes(kernel, block_m, block_n, block_d, block_dv, num_stages, dtype_bytes):
    """Shared memory a config needs: the tile held for the whole program plus one buffer per stage.

    Matches what Triton allocated for sm_90 in the AOT report (bench/GPU.md); the dK/dV kernel also
    stages the LSE and Delta rows (fp32, or fp64).
    """
    _check_kernel(kernel)
    if kernel == "fwd":  # Q held; K and V streamed
        held, streamed = block_m * block_d, block_n * (block_d + block_dv)
    elif kernel == "dkdv":  # K and V held; Q and dO streamed
        held, streamed = block_n * (block_d + block_dv), block_m * (block_d + block_dv)
    else:  # dq: Q and dO held; K and V streamed
        held, streamed = block_m * (block_d + block_dv), block_n * (block_d + block_dv)
    rows = 2 * block_m * num_stages * (8 if dtype_bytes == 8 else 4) if kernel == "dkdv" else 0
    return (held + num_stages * streamed) * dtype_bytes + rows


def hopeless(config, kernel, head_dim, head_dim_v, dtype_bytes, input_precision=None, compute_dk=True,
             compute_dv=True):
    """Whether a config is certain to spill: its accumulators and one score tile alone take more than 256
    registers per thread (160 on the FMA paths, whose operands also live in registers). The AOT report's
    ``--include-pruned`` calibration runs leave these out (each takes minutes to compile, to fail)."""
    bd, bdv = head_block(head_dim), head_block(head_dim_v)
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if kernel == "dkdv":
        acc = bn * (bd * bool(compute_dk) + bdv * bool(compute_dv))
    else:
        acc = bm * (bdv if kernel == "fwd" else bd)
    words = (acc + bm * bn) * (2 if dtype_bytes == 8 else 1) / (32 * config.num_warps)
    return words > (160 if matmul_path(dtype_bytes, input_precision).startswith("fma") else 256)


# The Tritons the table was checked under, as (major, minor): 3.9, what CI pins and the table is generated
# with, and 3.6, what the GPU machines run (bench/GPU.md, "On the GPU machines' Triton (3.6)").
CHECKED_TRITONS = ((3, 9), (3, 6))

# Tiles of CLEAN_TILES that spill under one of the checked Tritons although clean under the other:
# ``{(calibrated arch, variant, path, block_d): {(major, minor): tile keys}}``. keep() drops them under
# that Triton and under any Triton not in CHECKED_TRITONS (whose register allocation nobody has read), so
# each checked Triton is offered only tiles that compiled clean under it: the table lists the tiles clean
# under either, this what each one must not be offered. Keys with no clean tile under a Triton
# (NO_CLEAN_TILE_UNDER) are not here: with nothing clean to fall back to, they keep their list.
SPILLS_UNDER = {
    # sm_80 D = 64 16-bit dK/dV: 8 bytes of stack under ptxas 12.8, outside the loop; under 3.6 they save
    # 3% of the loop's instructions per score element on 32x128/8/3 (35.72 vs 36.81), under 3.9 16%.
    (80, "dkdv", "tc16", 64): {(3, 6): ((64, 128, 8, 3, None), (64, 64, 4, 3, None))},
    # Taken out of the table on 2026-11-30 because they spill under 3.6 (8-432 bytes), back since 2026-12-02
    # for 3.9, under which every AOT-catalogue launch of their key compiles them clean (66 rows).
    (80, "dkdv", "fma32", 64): {(3, 6): ((16, 128, 8, 2, None), (16, 64, 4, 2, None), (32, 32, 4, 2, None))},
    (80, "dkdv", "fma64", 64): {(3, 6): ((16, 64, 8, 2, None),)},
    (80, "dkdv", "fma64", 128): {(3, 6): ((16, 16, 4, 2, None), (32, 32, 8, 2, None))},
    (80, "dkdv_dv", "fma64", 256): {(3, 6): ((16, 16, 4, 2, None),)},
    (80, "dq", "fma64", 64): {(3, 6): ((32, 16, 16, 2, None),)},
    (80, "fwd", "fma32", 64): {(3, 6): ((32, 32, 4, 2, None),)},
    (80, "fwd", "tc16", 256): {(3, 6): ((64, 16, 4, 2, None),)},
    (80, "fwd", "tc32", 128): {(3, 6): ((16, 64, 4, 3, None),)},
    (90, "dkdv", "fma64", 128): {(3, 6): ((16, 32, 8, 2, None),)},
    (90, "dkdv", "tc16", 64): {(3, 6): ((64, 64, 4, 3, None),)},
    (90, "dkdv", "tc32", 128): {(3, 6): ((32, 128, 8, 2, None),)},
    (90, "dq", "fma32", 128): {(3, 6): ((64, 16, 4, 2, None),)},
    (90, "dq", "fma64", 64): {(3, 6): ((32, 16, 16, 2, None),)},
    (90, "dq", "fma64", 128): {(3, 6): ((32, 16, 8, 2, 255), (32, 16, 8, 2, None), (32, 32, 8, 2, None))},
    (90, "dq", "tc16", 256): {(3, 6): ((64, 16, 4, 2, None),)},
    (90, "dq", "tc32", 64): {(3, 6): ((64, 64, 4, 3, None),)},
    (90, "dq", "tc32", 128): {(3, 6): ((64, 16, 4, 2, None), (64, 32, 4, 2, None), (64, 32, 4, 3, None))},
    (90, "fwd", "fma32", 256): {(3, 6): ((32, 16, 8, 2, 255),)},
    (90, "fwd", "fma64", 64): {(3, 6): ((32, 32, 4, 2, None),)},
    (90, "fwd", "fma64", 128): {(3, 6): ((32, 32, 8, 2, None),)},
    # The feature variants (16-bit, blocks 64 and 128), from --include-pruned compiles of the attn-feat cases
    # under both Tritons (2026-12-02, 872 each): the tiles clean under only one of them.
    (80, "dkdv_features", "tc16", 64): {(3, 6): ((16, 16, 8, 1, None), (32, 128, 8, 2, None), (32, 128, 8, 3, None),
                                                 (32, 64, 4, 2, None), (32, 64, 4, 3, None))},
    (80, "dkdv_features", "tc16", 128): {(3, 6): ((16, 64, 4, 1, None), (16, 64, 4, 2, None), (32, 64, 8, 2, None)),
                                         (3, 9): ((16, 128, 8, 2, None),)},
    (80, "dq_features", "tc16", 64): {(3, 6): ((32, 16, 16, 2, None),)},
    (80, "dq_features", "tc16", 128): {(3, 6): ((16, 16, 4, 1, None), (32, 16, 16, 2, None), (64, 32, 4, 1, None))},
    (80, "fwd_features", "tc16", 64): {(3, 9): ((64, 32, 4, 2, None),)},
    (80, "fwd_features", "tc16", 128): {(3, 6): ((64, 16, 4, 2, None),)},
    (90, "dkdv_features", "tc16", 64): {(3, 9): ((32, 64, 4, 2, None), (32, 64, 4, 3, None))},
    (90, "dkdv_features", "tc16", 128): {(3, 6): ((16, 64, 4, 1, None),)},
    (90, "dq_features", "tc16", 128): {(3, 6): ((64, 32, 4, 1, None),)},
    (90, "fwd_features", "tc16", 128): {(3, 6): ((64, 32, 4, 1, None),), (3, 9): ((64, 32, 4, 2, None),)},
}


# Keys with no tile that compiles clean under a checked Triton: every candidate tile of them was compiled
# (``aot check --include-pruned``) and each one spills (bench/GPU.md, "On the GPU machines' Triton (3.6)").
# Their launches spill under that Triton whatever the autotuner picks (slower there, not wrong); the AOT
# check reports those rows' spills as known rather than failing on them (any other failure still fails).
# fp64 D = 256 dK and dQ under 3.6: 8-80 bytes of stack at best (2026-12-02).
NO_CLEAN_TILE_UNDER = {
    (80, "dkdv_dk", "fma64", 256): ((3, 6),),
    (80, "dq", "fma64", 256): ((3, 6),),
    (90, "dkdv_dk", "fma64", 256): ((3, 6),),
    (90, "dq", "fma64", 256): ((3, 6),),
}


def no_clean_tile(arch, variant, path, block_d, release=None) -> bool:
    """Whether :data:`NO_CLEAN_TILE_UNDER` says the (arch, variant, path, block_d) key has no clean tile under
    the Triton ``release`` (default: the installed one)."""
    release = triton_release() if release is None else release
    return release in NO_CLEAN_TILE_UNDER.get((calibrated(arch), variant, path, block_d), ())


def triton_release(version=None) -> tuple:
    """``(major, minor)`` of ``version`` (default: the installed Triton's ``__version__``)."""
    if version is None:
        version = triton.__version__
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def spills_under_this_triton(arch, variant, path, block_d, tile_key, release=None) -> bool:
    """Whether :data:`SPILLS_UNDER` takes ``tile_key`` out of the (arch, variant, path, block_d) list
    under the Triton ``release`` (default: the installed one)."""
    release = triton_release() if release is None else release
    listed = SPILLS_UNDER.get((calibrated(arch), variant, path, block_d), {})
    return any(tile_key in tiles for rel, tiles in listed.items()
               if rel == release or release not in CHECKED_TRITONS)


def keep(config, head_dim, dtype_bytes, arch=DEFAULT_ARCH, kernel="fwd", head_dim_v=None, input_precision=None,
         compute_dk=True, compute_dv=True, features=False):
    """Whether the autotuner may try an attention config for this launch.

    The config's tile must be listed in ``CLEAN_TILES`` (kernels/attention_tiles.py, generated from an
    ``--include-pruned`` AOT report: the tiles that compiled without spills, within shared memory and,
    for 16-bit and tf32 inputs, on the tensor cores, for every launch of the report with the same key)
    under the launch's calibrated architecture, kernel variant, matmul path and head-dim block. On parts
    other than sm_80/sm_90 it must also fit their shared memory, and it must not be one that
    :data:`SPILLS_UNDER` lists for the installed Triton. A measured table rather than a formula: register
    use of these kernels follows no model simple enough to predict which tiles spill.

    Args:
        config: a ``triton.Config`` from :func:`get_attn_fwd_configs` / :func:`get_attn_bwd_configs`.
        head_dim: D (the Q/K head dim). head_dim_v: Dv (defaults to D). Head dims below 64 use the
            tiles of 64 (smaller operand tiles than those checked).
        dtype_bytes: element size of the inputs (2, 4 or 8).
        arch: compute capability as an int (80, 86, 89, 90); below 90 the sm_80 table applies, with the
            arch's own shared memory limit.
        kernel: "fwd", "dkdv" or "dq".
        input_precision: the launch's ``INPUT_PRECISION`` ("tf32" or "ieee"); decides the path of fp32
            inputs. None: "ieee" (torch's default for fp32 matmuls).
        compute_dk, compute_dv: the dK/dV launch's ``COMPUTE_DK`` / ``COMPUTE_DV`` (see :func:`wide_heads`).
        features: the launch has a feature flag on (:func:`has_features`): its own variant of the table
            where that lists the launch's path and head-dim block (the 16-bit path at blocks 64 and 128, from
            the ``attn-feat`` AOT cases), the plain launch's list elsewhere (not checked by the AOT report:
            those launches may spill, which costs speed, not correctness).
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    bd, bdv = head_block(head_dim), head_block(head_dim_v)
    tile = Tile.of(config)
    if tile.tma and (kernel not in TMA_KERNELS or features or dtype_bytes != 2 or max(bd, bdv) > 128
                     or not tma_supported(arch)):
        return False
    # The table's tiles fit sm_80's and sm_90's shared memory as compiled; other parts have less (~100 KB
    # on sm_86/89): there the estimate (an upper bound of what Triton allocates) must fit.
    smem = attn_smem_bytes(kernel, tile.block_m, tile.block_n, bd, bdv, tile.num_stages, dtype_bytes)
    if arch not in CALIBRATED and smem > limits(arch).smem_per_block:
        return False
    table = CLEAN_TILES.get(calibrated(arch), {})
    path, block = matmul_path(dtype_bytes, input_precision), max(64, bd, bdv)
    tiles = None
    if features:
        variant = tile_variant(kernel, head_dim, head_dim_v, compute_dk, compute_dv, features=True)
        tiles = table.get(variant, {}).get(path, {}).get(block)
    if tiles is None:  # a plain launch, or a feature launch on a path / head-dim block not calibrated for them
        variant = tile_variant(kernel, head_dim, head_dim_v, compute_dk, compute_dv, tma=tile.tma)
        tiles = table.get(variant, {}).get(path, {}).get(block, ())
    return tile.key() in tiles and not spills_under_this_triton(arch, variant, path, block, tile.key())


def prune(configs, args, *, kernel, dtype_bytes, arch):
    """The configs one launch's autotuner may time.

    - those :func:`keep` accepts for the launch; TMA tiles only where the launch's K and V allow them
      (``TMA_OK``, from :func:`tma_compatible`);
    - no taller than the (bucketed) length of the rows a program covers (taller tiles only compute
      padding), or the shortest kept ones when none is that short (sm_90 tensor-core tiles have 64 rows
      at least);
    - pipelined ones (``num_stages > 1``) when there are: single-stage tiles are last resorts;
    - at most :data:`MAX_TUNED`, the largest first (most work per program), to bound autotuning time;
    - when nothing is left, the smallest config of the list.

    Called by the launchers' autotuners (``early_config_prune``) and by the AOT report.

    Args:
        configs: the autotuner's list for ``kernel``.
        args: the launch's arguments by kernel parameter name: ``HEAD_D``, ``HEAD_DV``, ``LQ_BUCKET``,
            ``LK_BUCKET``, ``INPUT_PRECISION``, ``TMA_OK``, the feature flags and, for "dkdv",
            ``COMPUTE_DK`` / ``COMPUTE_DV`` are read.
        kernel: "fwd", "dkdv" or "dq".
        dtype_bytes: element size of Q.
        arch: compute capability of the launch's device as an int.

    Returns:
        The configs to time (never empty).
    """
    kept = [c for c in configs
            if keep(c, args["HEAD_D"], dtype_bytes, arch, kernel=kernel, head_dim_v=args["HEAD_DV"],
                    input_precision=args.get("INPUT_PRECISION"), compute_dk=args.get("COMPUTE_DK", True),
                    compute_dv=args.get("COMPUTE_DV", True), features=has_features(args))
            and (args.get("TMA_OK") or not c.kwargs.get("TMA"))]
    rows = "BLOCK_M" if kernel != "dkdv" else "BLOCK_N"
    length = args["LQ_BUCKET"] if kernel != "dkdv" else args["LK_BUCKET"]
    if kept:
        fit = max(length, min(c.kwargs[rows] for c in kept))
        kept = [c for c in kept if c.kwargs[rows] <= fit]
    kept = [c for c in kept if c.num_stages > 1] or kept
    kept = sorted(kept, key=lambda c: -c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:MAX_TUNED]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
