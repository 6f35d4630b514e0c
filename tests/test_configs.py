"""Tile policy: the config modules (kernels/linear_configs.py, kernels/attention_configs.py), the
architecture table (kernels/arch.py) and the launchers' autotuner prunes that use them.

Nothing here launches a kernel: these are the rules the autotuners and the AOT report both apply.
"""

import dataclasses
import inspect

import pytest
import torch

from gradkernels import _device
from gradkernels.kernels import arch as arch_table
from gradkernels.kernels import attention as attention_kernels
from gradkernels.kernels import attention_configs as AC
from gradkernels.kernels import linear as linear_kernels
from gradkernels.kernels import linear_configs as LC
from gradkernels.kernels.attention_tiles import CLEAN_TILES
from gradkernels.ops import attention as attention_ops
from gradkernels.ops import linear as linear_ops

# ----------------------------------------------------------------------------------------------------
# Layout: device code in kernels/<family>.py, host-side policy in kernels/<family>_configs.py
# ----------------------------------------------------------------------------------------------------


def _is_jit(obj):
    return hasattr(obj, "arg_names") and hasattr(obj, "fn")  # compiled or interpreted @triton.jit


def _defined_in(module):
    """Functions and classes whose code is in ``module`` (Triton's interpreter adds its own helpers to a
    kernel module's globals once a kernel has run: those are not the module's)."""
    return {n: o for n, o in vars(module).items()
            if (inspect.isfunction(o) or inspect.isclass(o) or _is_jit(o))
            and getattr(getattr(o, "fn", o), "__module__", None) == module.__name__}


@pytest.mark.parametrize("kernels,configs", [(linear_kernels, LC), (attention_kernels, AC)])
def test_kernel_modules_hold_device_code_and_config_modules_none(kernels, configs):
    defined = _defined_in(kernels)
    assert defined and all(_is_jit(o) for o in defined.values()), defined
    for module in (configs, arch_table):
        assert not any(_is_jit(o) for o in vars(module).values()), module.__name__


# ----------------------------------------------------------------------------------------------------
# The architecture table and the arch of a device
# ----------------------------------------------------------------------------------------------------


def test_one_architecture_table_for_prunes_and_report():
    assert set(arch_table.ARCHS) == {80, 86, 89, 90}
    assert arch_table.ARCHS[90].smem_per_block == 227 * 1024 and arch_table.ARCHS[80].smem_per_block == 163 * 1024
    assert arch_table.ARCHS[86].smem_per_block == arch_table.ARCHS[89].smem_per_block == 99 * 1024
    assert arch_table.ARCHS[90].tensor_core_op == "HGMMA" and arch_table.ARCHS[80].tensor_core_op == "HMMA"
    assert arch_table.limits(75) == arch_table.limits(100) == arch_table.ARCHS[80], "unknown parts: sm_80's limits"
    assert [arch_table.calibrated(a) for a in (80, 86, 89, 90, 100)] == [80, 80, 80, 90, 90]
    assert arch_table.CALIBRATED == (80, 90)
    paths = {(b, p): arch_table.matmul_path(b, p) for b in (2, 4, 8) for p in (None, "tf32", "ieee")}
    assert paths[(2, None)] == paths[(2, "tf32")] == "tc16" and paths[(4, "tf32")] == "tc32"
    assert paths[(4, None)] == paths[(4, "ieee")] == "fma32" and paths[(8, "tf32")] == "fma64"


def test_device_arch_reads_cuda_capability_and_assumes_sm90_elsewhere(monkeypatch):
    assert _device.device_arch(torch.device("cpu")) == arch_table.DEFAULT_ARCH == 90
    assert _device.device_arch(torch.device("meta")) == 90
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert _device.device_arch(torch.device("cuda", 0)) == 86


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


def test_linear_tiles_are_named_records_in_factory_order():
    configs = LC.get_linear_configs()
    assert len(configs) == len(LC.TILES) == len(set(LC.TILES))
    for tile, c in zip(LC.TILES, configs):
        assert c.kwargs == {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
                            "GROUP_M": tile.group_m, **({"TMA": True} if tile.tma else {}),
                            **({"PERSISTENT": True} if tile.persistent else {})}
        assert (c.num_warps, c.num_stages, c.maxnreg) == (tile.num_warps, tile.num_stages, tile.maxnreg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LC.TILES[0].block_m = 1


def test_linear_keep_follows_shared_memory_of_the_arch():
    """fp32 tiles whose pipeline needs more than ~99 KB pass on sm_80 and sm_90 and fail on sm_86/sm_89,
    by the one architecture table."""
    flags = {"INPUT_PRECISION": "tf32"}
    for c in LC.get_linear_configs():
        kw = c.kwargs
        smem = LC.matmul_smem_bytes(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, 4)
        if smem > arch_table.ARCHS[86].smem_per_block:
            assert not LC.keep(c, 4, 86, flags) and not LC.keep(c, 4, 89, flags)
        if smem > arch_table.ARCHS[80].smem_per_block:
            assert not LC.keep(c, 4, 80, flags)


def test_linear_prune_keeps_the_last_tile_for_fp64_derivatives_and_falls_back_to_it():
    """fp64 with the gelu derivative and the bias gradient: keep() accepts only the last tile (16 rows,
    maxnreg=255); a list keep() rejects entirely leaves its last config."""
    configs = LC.get_linear_configs()
    flags = {"PROLOGUE_ACT": "gelu", "ROW_SUM": True, "INPUT_PRECISION": "ieee"}
    for arch in (80, 90):
        assert LC.prune(configs, flags, dtype_bytes=8, arch=arch) == configs[-1:]
        assert not any(LC.keep(c, 8, arch, flags) for c in configs[:-1])
        assert LC.prune(configs[:-1], flags, dtype_bytes=8, arch=arch) == configs[-2:-1]
    plain = LC.prune(configs, {"INPUT_PRECISION": "ieee"}, dtype_bytes=2, arch=90)
    assert len(plain) > 1 and plain == [c for c in configs if LC.keep(c, 2, 90, {"INPUT_PRECISION": "ieee"})
                                        and not c.kwargs.get("TMA")]  # no TMA tile without TMA_OK
    with_tma = LC.prune(configs, {"INPUT_PRECISION": "ieee", "TMA_OK": 1}, dtype_bytes=2, arch=90)
    assert with_tma == [c for c in configs if LC.keep(c, 2, 90, {"INPUT_PRECISION": "ieee"})]


def test_linear_autotuner_prunes_with_the_config_module_for_the_device_arch(monkeypatch):
    """The launcher's autotuner calls linear_configs.prune with the operand size and the arch of the
    operand's device: sm_90 for a CPU tensor, the device's own capability on CUDA."""
    tuner = linear_ops._autotuned("dw")
    configs = LC.get_linear_configs()
    a = torch.empty(4, 4, dtype=torch.float32)
    flags = {"HAS_BIAS": True, "PROLOGUE_ACT": "gelu", "EPILOGUE_ACT": None, "STORE_PRE": False,
             "ROW_SUM": True, "SPLIT_K": 1, "INPUT_PRECISION": "tf32"}
    expect = {arch: LC.prune(configs, flags, dtype_bytes=4, arch=arch) for arch in (80, 90)}
    assert expect[80] != expect[90]
    assert tuner.early_config_prune(configs, {"A": a}, **flags) == expect[90]
    monkeypatch.setattr(_device, "device_arch", lambda device: 80)
    assert tuner.early_config_prune(configs, {"A": a}, **flags) == expect[80]


def test_linear_prune_is_m_aware():
    """Decoding sizes: every kept tile is at least half filled (each tensor-core instruction at least half
    used); the autotune key's sizes decide, so one bucket of token counts keeps one set of tiles."""
    configs = LC.get_linear_configs()
    plain = {"INPUT_PRECISION": "ieee", "EPILOGUE_ACT": None, "PROLOGUE_ACT": None, "ROW_SUM": False}

    def kept(arch, m, n, dtype_bytes=2, **flags):
        return LC.prune(configs, {**plain, **flags, "M_KEY": m, "N_KEY": n}, dtype_bytes=dtype_bytes, arch=arch)

    # 16 or 32 tokens run swapped: 4096 features in the rows, the tokens in the columns.
    for arch in (80, 90):
        for tokens in (16, 32):
            tiles = kept(arch, 4096, tokens)
            assert tiles and all(LC.fill(c, 4096, tokens) > LC.MIN_FILL for c in tiles)
            assert max(c.kwargs["BLOCK_N"] for c in tiles) <= tokens
        # 64 tokens (not swapped): 64-row tiles, which a wgmma fills.
        tiles = kept(arch, 64, 4096)
        assert tiles and all(c.kwargs["BLOCK_M"] <= 64 for c in tiles)
    # Large launches keep the large tiles.
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 256 for c in kept(90, 4096, 4096))
    # Nothing half filled (16 x 16 on sm_90, where every 16-bit tile has 64 rows): the best-filled ones.
    tiles = kept(90, 16, 16)
    best = max(LC.fill(c, 16, 16) for c in configs if LC.keep(c, 2, 90, plain))
    assert tiles and best <= LC.MIN_FILL and all(LC.fill(c, 16, 16) == best for c in tiles)
    # Without the sizes (a caller that does not know them) nothing is dropped for its fill.
    assert LC.prune(configs, {**plain, "TMA_OK": 1}, dtype_bytes=2, arch=90) == [c for c in configs
                                                                                 if LC.keep(c, 2, 90, plain)]


def test_linear_swap_and_autotune_keys():
    assert LC.swap_operands(1, 4096) and LC.swap_operands(32, 64)
    assert not LC.swap_operands(33, 4096) and not LC.swap_operands(16, 63)
    # The token dimension is bucketed, feature dimensions are exact.
    assert LC.autotune_keys(17, 4096, 1000, "m") == (32, 4096, 1000)
    assert LC.autotune_keys(4096, 17, 1000, "n") == (4096, 32, 1000)
    assert LC.autotune_keys(300, 500, 1100, "k") == (300, 500, 2048)
    assert LC.autotune_keys(17, 4096, 1000, "m") == LC.autotune_keys(30, 4096, 1000, "m")
    with pytest.raises(ValueError, match="tokens must be"):
        LC.autotune_keys(1, 2, 3, "x")


def test_choose_split_and_bucket():
    assert LC.choose_split(4096, 4096, 4096, 132) == 1, "32 x 32 output tiles fill the GPU"
    assert LC.choose_split(64, 256, 8192, 132) == 16, "2 output tiles: split the reduction"
    assert LC.choose_split(64, 256, 1024, 132) == 4, "at least 256 of the reduction per split"
    assert LC.choose_split(0, 256, 1024, 132) == 1
    assert [LC.bucket(n) for n in (0, 1, 3, 64, 65)] == [1, 1, 4, 64, 128]


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def test_attention_tiles_are_named_records_and_read_back_from_configs():
    bwd = AC.get_attn_bwd_configs()
    lists = {"fwd": (AC.FWD_TILES, AC.get_attn_fwd_configs()), "dkdv": (AC.DKDV_TILES, bwd["dkdv"]),
             "dq": (AC.DQ_TILES, bwd["dq"])}
    for kernel, (tiles, configs) in lists.items():
        assert len(set(tiles)) == len(tiles), kernel
        assert [AC.Tile.of(c) for c in configs] == list(tiles), kernel
    assert AC.Tile(16, 16, 8, 1, 255).key() == (16, 16, 8, 1, 255), "the table's tuple order"
    assert AC.Tile(128, 128, 8, 3, tma=True).key() == (128, 128, 8, 3, None)
    assert AC.Tile.of(AC.Tile(128, 128, 8, 3, tma=True).config()).tma, "TMA survives the round trip"
    assert "TMA" not in AC.Tile(128, 128, 8, 3).config().kwargs, "plain configs launch the kernel's default"

# ----------------------------------------------------------------------------------------------------
# Config factories (the autotuner and the AOT report prune with these)
# ----------------------------------------------------------------------------------------------------


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)


def _launches(dtype_bytes, precision, d):
    """(kernel, input_precision, compute_dk, compute_dv) of every launch the launchers make at head dim d."""
    bwd = AC.backward_precision(precision, d, d)
    kv = [(True, False), (False, True)] if AC.wide_heads(d, d) else [(True, True)]
    return [("fwd", precision, True, True), ("dq", bwd, True, True)] + [("dkdv", bwd, dk, dv) for dk, dv in kv]


@pytest.mark.parametrize("arch", [80, 86, 90])
@pytest.mark.parametrize("dtype_bytes,precision", [(2, None), (4, "tf32"), (4, "ieee"), (8, None)])
def test_every_head_dim_keeps_a_config(arch, dtype_bytes, precision):
    """keep() leaves the autotuner a config for every launch the launchers make at every head dim (the
    fallback to a config keep() rejects is never needed); on ~100 KB parts each fits shared memory."""
    lists = {"fwd": AC.get_attn_fwd_configs(), **AC.get_attn_bwd_configs()}
    for d in (16, 40, 64, 80, 96, 128, 160, 256):
        for kernel, prec, dk, dv in _launches(dtype_bytes, precision, d):
            if kernel != "fwd" and AC.head_block(d) == 256 and dtype_bytes == 8 and arch not in (80, 90):
                continue  # fp64 backward tiles of D > 128 exceed ~100 KB of shared memory: a documented limit
            kept = [c for c in lists[kernel]
                    if AC.keep(c, d, dtype_bytes, arch, kernel=kernel, input_precision=prec, compute_dk=dk, compute_dv=dv)]
            assert kept, f"no {kernel} config for D={d}, {dtype_bytes}-byte inputs ({prec}, {dk}, {dv}), sm_{arch}"
            if arch == 86:
                for c in kept:
                    assert AC.attn_smem_bytes(kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], AC.head_block(d),
                                              AC.head_block(d), c.num_stages, dtype_bytes) <= arch_table.ARCHS[arch].smem_per_block


def test_tile_table_matches_the_config_lists_and_the_rules():
    """The generated table (kernels/attention_tiles.py) only names tiles of the factories' lists, never a
    sub-64-row 16-bit/tf32 tile on sm_90 (wgmma), and keep() follows it: in the table -> kept."""
    lists = {"fwd": AC.get_attn_fwd_configs(), **AC.get_attn_bwd_configs()}
    listed = {k: {_tile(c) for c in v} for k, v in lists.items()}
    count = 0
    for arch, variants in CLEAN_TILES.items():
        for variant, paths in variants.items():
            kernel = variant.split("_")[0]
            for path, by_d in paths.items():
                for block_d, tiles in by_d.items():
                    for t in tiles:
                        count += 1
                        assert t in listed[kernel], (arch, variant, path, block_d, t)
                        rows = t[1] if kernel == "dkdv" else t[0]
                        if arch == 90 and path.startswith("tc"):
                            assert rows >= 64, (variant, path, block_d, t)
    assert count > 100
    by_tile = {_tile(c): c for c in lists["fwd"] if not c.kwargs.get("TMA")}
    for t in CLEAN_TILES[90]["fwd"]["tc16"][128]:
        assert AC.keep(by_tile[t], 128, 2, 90) and AC.keep(by_tile[t], 80, 2, 90)
    assert not any(AC.keep(c, 64, 2, 90) for t, c in by_tile.items() if t[0] < 64)
    assert any(AC.keep(c, 64, 2, 80) for t, c in by_tile.items() if t[0] < 64), "sm_80: small tiles on mma.sync"

    def area(kernel, *args, **kw):
        return max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in lists[kernel] if AC.keep(c, *args, kernel=kernel, **kw))

    for arch in (80, 90):
        for kernel in ("fwd", "dq"):
            assert area(kernel, 128, 8, arch) <= area(kernel, 128, 2, arch)
            assert area(kernel, 256, 2, arch) <= area(kernel, 64, 2, arch)


def test_feature_launches_have_their_own_tile_variant(monkeypatch):
    """Launches with feature flags are checked under "<variant>_features", so their spills do not shrink the
    plain launches' lists; a table without that variant (generated before the feature cases) gives them
    the plain list."""
    assert AC.tile_variant("fwd", 64, 64, features=True) == "fwd_features"
    assert AC.tile_variant("dkdv", 256, 256, compute_dv=False, features=True) == "dkdv_dk_features"
    assert AC.has_features({"HAS_DROPOUT": True}) and AC.has_features({"IS_VARLEN": True, "HAS_LEFT": False})
    assert not AC.has_features({"IS_CAUSAL": True, "HEAD_D": 64, "HAS_ALIBI": False})
    tile = AC.Tile(64, 64, 4, 2)
    table = {90: {"fwd": {"tc16": {64: (tile.key(),)}}}}
    monkeypatch.setattr(AC, "CLEAN_TILES", table)
    assert AC.keep(tile.config(), 64, 2, 90, kernel="fwd", features=True)
    table[90]["fwd_features"] = {"tc16": {64: ()}}
    assert not AC.keep(tile.config(), 64, 2, 90, kernel="fwd", features=True)
    assert AC.keep(tile.config(), 64, 2, 90, kernel="fwd")
    small = AC.Tile(32, 32, 4, 2)
    table[90]["fwd_features"] = {"tc16": {64: (small.key(),)}}
    configs = [tile.config(), small.config()]
    args = {"HEAD_D": 64, "HEAD_DV": 64, "LQ_BUCKET": 1024, "LK_BUCKET": 1024}
    assert [AC.Tile.of(c) for c in AC.prune(configs, args, kernel="fwd", dtype_bytes=2, arch=90)] == [tile]
    assert [AC.Tile.of(c) for c in AC.prune(configs, dict(args, HAS_SOFTCAP=True), kernel="fwd", dtype_bytes=2,
                                            arch=90)] == [small]


def test_variants_precision_and_split_rules():
    assert AC.tile_variant("dkdv", 64, 64) == "dkdv" and AC.tile_variant("dkdv", 64, 64, compute_dv=False) == "dkdv"
    assert AC.tile_variant("dkdv", 256, 256, compute_dv=False) == "dkdv_dk"
    assert AC.tile_variant("dkdv", 40, 160, compute_dk=False) == "dkdv_dv"
    assert AC.tile_variant("dq", 256, 256) == "dq"
    with pytest.raises(ValueError, match="kernel must be"):
        AC.tile_variant("bwd", 64, 64)
    assert AC.backward_precision("tf32", 256, 256) == "ieee" and AC.backward_precision("tf32", 128, 128) == "tf32"
    assert AC.backward_precision("ieee", 256, 256) == "ieee" and AC.backward_precision(None, 256, 64) is None
    assert AC.wide_heads(160, 64) and not AC.wide_heads(128, 128)
    assert arch_table.matmul_path(4, "tf32") == "tc32" and arch_table.matmul_path(4, None) == "fma32" and arch_table.matmul_path(8, "tf32") == "fma64"
    assert AC.preprocess_config(256, 8) == {"BLOCK_M": 32} and AC.preprocess_config(64, 2) == {"BLOCK_M": 64}


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_attention_autotuners_prune_to_fitting_pipelined_tiles(kernel):
    """The GPU-only autotune path: its keys name real kernel arguments (the Autotuner checks them on
    construction) and its pruner keeps fitting, pipelined configs no taller than the sequence (or the
    shortest that fit, when none is that short: sm_90 tensor-core tiles have 64 rows at least)."""
    tuner = attention_ops._autotuned(kernel)
    assert "LQ_BUCKET" in tuner.keys and "HEAD_D" in tuner.keys
    configs = AC.get_attn_fwd_configs() if kernel == "fwd" else AC.get_attn_bwd_configs()[kernel]
    rows = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    q = torch.empty(1, 1, 8, 64, dtype=torch.bfloat16)  # a CPU tensor: the pruner assumes sm_90
    for short, long in ((16, 4096), (4096, 4096)):
        lq_bucket, lk_bucket = (long, short) if kernel == "dkdv" else (short, long)
        kept = tuner.early_config_prune(configs, {"Q": q, "LQ_BUCKET": lq_bucket, "LK_BUCKET": lk_bucket},
                                        HEAD_D=64, HEAD_DV=64, INPUT_PRECISION="ieee")
        fitting = [c for c in configs if AC.keep(c, 64, 2, 90, kernel=kernel)]
        assert kept and all(c in fitting and c.num_stages > 1 for c in kept)
        shortest = min(c.kwargs[rows] for c in fitting)
        assert all(c.kwargs[rows] <= max(short, shortest) for c in kept)
        if short == 16:
            assert shortest == 64, "16-bit sm_90 tiles need 64 rows for wgmma"
            assert {c.kwargs[rows] for c in kept} == {64}
    assert len(kept) > 1  # long sequences leave the autotuner a choice


def test_seqlen_bucket_shares_keys_within_a_power_of_two():
    assert AC.seqlen_bucket(1) == AC.seqlen_bucket(16) == 16
    assert AC.seqlen_bucket(1025) == AC.seqlen_bucket(2048) == 2048
    assert AC.seqlen_bucket(2049) == 4096


def test_tiles_that_spill_under_one_triton_are_dropped_there(monkeypatch):
    """SPILLS_UNDER names tiles of the table that spill under one checked Triton: keep() drops them under
    that one and under unchecked ones, keeps them under the others; entries name listed tiles only."""
    for (arch, variant, path, block_d), by_release in AC.SPILLS_UNDER.items():
        for release, tiles in by_release.items():
            assert release in AC.CHECKED_TRITONS
            assert tiles and all(t in CLEAN_TILES[arch][variant][path][block_d] for t in tiles)
    assert AC.triton_release("3.6.0") == (3, 6) and AC.triton_release("3.10.0rc1") == (3, 10)
    assert AC.triton_release("3.9.0+git1a2b") == (3, 9)
    spilling = AC.Tile(64, 128, 8, 3).config()
    clean = AC.Tile(32, 128, 8, 3).config()
    assert (64, 128, 8, 3, None) in AC.SPILLS_UNDER[(80, "dkdv", "tc16", 64)][(3, 6)]

    def kept(release, config, arch=80):
        monkeypatch.setattr(AC, "triton_release", lambda version=None: release)
        return AC.keep(config, 64, 2, arch, kernel="dkdv")

    assert kept((3, 9), spilling) and kept((3, 9), spilling, arch=86)
    assert not kept((3, 6), spilling) and not kept((3, 6), spilling, arch=86)
    assert not kept((3, 7), spilling), "a Triton nobody checked gets the tiles clean under every checked one"
    assert kept((3, 6), clean) and kept((3, 7), clean) and kept((3, 9), clean)
    assert not kept((3, 6), AC.Tile(64, 64, 4, 3).config()) and kept((3, 9), AC.Tile(64, 64, 4, 3).config())
    # A tile the table lists for 3.9 only (it spills under 3.6): sm_90 tf32 dQ at D = 128.
    tf32 = AC.Tile(64, 32, 4, 3).config()
    for release, offered in (((3, 9), True), ((3, 6), False), ((3, 7), False)):
        monkeypatch.setattr(AC, "triton_release", lambda version=None: release)
        assert AC.keep(tf32, 128, 4, 90, kernel="dq", input_precision="tf32") is offered, release


def test_feature_launches_get_the_tiles_clean_under_the_installed_triton(monkeypatch):
    """The feature variants list the tiles clean under either checked Triton; SPILLS_UNDER takes out, per
    Triton, those that spill under it. sm_80 D = 64 feature dK/dV: its four largest tiles spill under 3.6
    (8-24 bytes), so 3.6's autotuner gets the clean ones below them and 3.9's keeps them; sm_90 D = 64 the
    other way round for 32x64/4/2-3."""
    def pruned(release, arch, head_dim=64):
        monkeypatch.setattr(AC, "triton_release", lambda version=None: release)
        args = {"HEAD_D": head_dim, "HEAD_DV": head_dim, "LQ_BUCKET": 4096, "LK_BUCKET": 4096,
                "INPUT_PRECISION": None, "HAS_DROPOUT": True, "IS_VARLEN": True}
        configs = AC.prune(AC.get_attn_bwd_configs()["dkdv"], args, kernel="dkdv", dtype_bytes=2, arch=arch)
        return {AC.Tile.of(c).key() for c in configs}

    spill_36 = set(AC.SPILLS_UNDER[(80, "dkdv_features", "tc16", 64)][(3, 6)])
    assert (32, 128, 8, 3, None) in spill_36
    under_36, under_39 = pruned((3, 6), 80), pruned((3, 9), 80)
    assert under_36 and not under_36 & spill_36 and all(t[3] > 1 for t in under_36)
    assert (32, 128, 8, 3, None) in under_39
    assert pruned((3, 6), 86) == under_36
    listed = set(CLEAN_TILES[80]["dkdv_features"]["tc16"][64])
    assert under_36 <= listed and under_39 <= listed
    spill_39 = set(AC.SPILLS_UNDER[(90, "dkdv_features", "tc16", 64)][(3, 9)])
    assert not pruned((3, 9), 90) & spill_39
    monkeypatch.setattr(AC, "triton_release", lambda version=None: (3, 6))
    assert all(AC.keep(AC.Tile(*t[:4], maxnreg=t[4]).config(), 64, 2, 90, kernel="dkdv", features=True)
               for t in spill_39)


def test_keys_with_no_clean_tile_name_listed_keys_and_checked_tritons():
    """NO_CLEAN_TILE_UNDER (the AOT check's known spills) names keys of the table, under checked Tritons only,
    and none of them also in SPILLS_UNDER for the same Triton (nothing clean is left to drop to)."""
    assert AC.NO_CLEAN_TILE_UNDER
    for (arch, variant, path, block_d), releases in AC.NO_CLEAN_TILE_UNDER.items():
        assert CLEAN_TILES[arch][variant][path][block_d], (arch, variant, path, block_d)
        assert releases and all(r in AC.CHECKED_TRITONS for r in releases)
        assert not set(AC.SPILLS_UNDER.get((arch, variant, path, block_d), {})) & set(releases)
        assert AC.no_clean_tile(arch, variant, path, block_d, release=releases[0])
        assert not AC.no_clean_tile(arch, variant, path, block_d, release=(3, 9))
    assert AC.no_clean_tile(86, "dq", "fma64", 256, release=(3, 6)), "sm_86 reads the sm_80 keys"
    assert not AC.no_clean_tile(90, "dq", "fma32", 256, release=(3, 6))
