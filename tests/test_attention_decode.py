"""Decoding attention (``kernels/attention_decode.py``): query lengths up to 16 run the split-KV kernel with
the query heads of each kv head packed into one tile's rows, and a combine kernel that merges the splits.

Checked against the two oracles of test_attention.py (forward and the backward that consumes its LSE),
with the key splits forced small so that the short test lengths span several splits and the merge runs;
the routing, the packing's program count and the split heuristic's rules are checked directly.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradkernels
from gradkernels import reference, testing
from gradkernels.kernels import attention_configs as configs
from gradkernels.ops import attention as attention_ops
from test_attention import _oracles, _qkv, _run_and_check
from utils import DEVICE, DTYPES, FACTOR_OUTPUT, assert_close


class _Launches:
    """Stands in for the decoding kernels in the launcher (launched directly, with fixed tiles, on any
    backend): records each launch's kernel name, grid and arguments, and runs it."""

    NAMES = ("attn_decode_kernel", "attn_decode_combine_kernel")

    def __init__(self, monkeypatch):
        self.seen = []
        for name in self.NAMES:
            monkeypatch.setattr(attention_ops.kernels, name, self._wrap(name, getattr(attention_ops.kernels, name)))

    def _wrap(self, name, kernel):
        seen = self.seen

        class Wrapped:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append((name, grid, args))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Wrapped()

    def names(self):
        return [name for name, _, _ in self.seen]


# (B, Hq, Hkv, Lq, Lk, D, Dv, causal, top_left, dtype): one token and a few (speculative decoding), GQA 4:1
# and 3:1, MQA, MHA, odd key counts (partial last block and split), head dims 40 and 80, Dv != D, rows
# that see no key (bottom-right with Lq > Lk), a top-left mask, and 8 x 9 = 72 packed rows (three row
# blocks of 32).
CASES = [
    (2, 8, 2, 1, 257, 64, 64, True, False, torch.float32),
    (1, 4, 1, 1, 113, 40, 40, False, False, torch.float16),
    (1, 3, 1, 5, 97, 80, 80, True, False, torch.float64),
    (1, 2, 2, 16, 37, 64, 48, True, False, torch.float32),
    (1, 2, 1, 9, 5, 32, 32, True, False, torch.float64),  # 4 of 9 rows see no key
    (1, 4, 2, 7, 61, 16, 16, True, True, torch.float32),  # top-left: row i sees keys 0..i
    (1, 8, 1, 9, 200, 24, 24, True, False, torch.float16),  # 72 packed rows: three row blocks
    (1, 1, 1, 1, 1, 16, 16, False, False, torch.float64),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv,causal,top_left,dtype", CASES)
def test_decode_matches_the_reference_across_splits(b, hq, hkv, lq, lk, d, dv, causal, top_left, dtype, monkeypatch):
    monkeypatch.setattr(configs, "DECODE_MIN_KEYS", 32)  # several splits at test lengths
    launches = _Launches(monkeypatch)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv, dtype)
    _run_and_check(q, k, v, causal, top_left)
    if gradkernels.backend_for(q) != "torch":
        assert launches.names() == ["attn_decode_kernel", "attn_decode_combine_kernel"]
        grid, args = launches.seen[0][1], launches.seen[0][2]
        from gradkernels.kernels import attention_decode

        splits = args[attention_decode.attn_decode_kernel.arg_names.index("NUM_SPLITS")]
        rows = hq // hkv * lq
        block_m = configs.decode_config(rows, d, dv, q.element_size())["BLOCK_M"]
        # GQA packing: one program per (kv head, split, row block), not per query head.
        assert grid == (b * hkv * splits * math.ceil(rows / block_m),)
        if lk >= 64:
            assert splits > 1, "the merge was not exercised"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_in_every_dtype(dtype, monkeypatch):
    """One GQA decode step with several splits in each dtype the run covers (bf16 on CUDA only: Triton's
    interpreter cannot do bf16 arithmetic), D = 80 (a masked head-dim block)."""
    monkeypatch.setattr(configs, "DECODE_MIN_KEYS", 32)
    _run_and_check(*_qkv(2, 6, 2, 2, 129, 80, 80, dtype), True)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 1000])
def test_any_split_count_gives_the_same_attention(num_splits):
    """Explicit split counts through the launcher, up to more splits than key blocks (then one block each):
    the causal edge (keys up to 77..79 of 150) falls inside, before or after a split, and later splits see
    nothing at all; the LSE with its residual stays exact to fp64 rounding."""
    q, k, v = (t.detach() for t in _qkv(1, 6, 2, 3, 150, 40, 40, torch.float64))
    scale = 0.2
    out = torch.empty(1, 6, 3, 40, dtype=torch.float64, device=DEVICE)
    lse, lse_lo = (torch.empty(1, 6, 3, dtype=torch.float64, device=DEVICE) for _ in range(2))
    attention_ops._decode(q, k, v, out, lse, lse_lo, scale, 77, num_splits=num_splits)
    # Row i sees keys j <= i + 77: bottom-right attention over the first 80 keys.
    kk, vv = k[:, :, :80], v[:, :, :80]
    ref = testing.attention_reference(q, kk, vv, causal=True, scale=scale)
    floor = testing.attention_bounds(q, kk, vv, causal=True, scale=scale)
    same_out, same_lse = reference.standard_attention(q, kk, vv, True, scale, return_lse=True)
    assert_close(out, same_out, ref["out"], FACTOR_OUTPUT, "out", floor=floor["out"])
    assert_close(lse, same_lse, ref["lse"], FACTOR_OUTPUT, "lse", floor=floor["lse"])
    assert (attention_ops.exact_lse(lse, lse_lo) - ref["lse"]).abs().max() <= 1e-12


def test_decode_is_bitwise_deterministic_and_routed_by_query_length(monkeypatch):
    monkeypatch.setattr(configs, "DECODE_MIN_KEYS", 32)
    q, k, v = (t.detach() for t in _qkv(1, 4, 2, 3, 300, 64, 64, torch.float32))
    first = gradkernels.attention(q, k, v, causal=True, return_lse=True)
    second = gradkernels.attention(q, k, v, causal=True, return_lse=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if gradkernels.backend_for(q) == "torch":
        return
    launches = _Launches(monkeypatch)
    launch = attention_ops._launch  # the forward kernel goes through it (its autotuner on a GPU)
    monkeypatch.setattr(attention_ops, "_launch", lambda kernel, *a: (launches.seen.append((kernel, None, a)),
                                                                      launch(kernel, *a))[1])
    for lq in (configs.DECODE_MAX_LQ, configs.DECODE_MAX_LQ + 1):
        q17 = torch.randn(1, 4, lq, 64, device=DEVICE)
        gradkernels.attention(q17, k, v, causal=True)
    assert launches.names() == ["attn_decode_kernel", "attn_decode_combine_kernel", "fwd"]


def test_strided_layouts_and_preallocated_outputs():
    """(B, L, H, D) projections seen as (B, H, L, D) and K/V slices of one packed tensor: read in place,
    O written in q's layout, the LSE into a caller's strided buffer."""
    b, h, hkv, lq, lk, d = 2, 4, 2, 3, 70, 40
    q = torch.randn(b, lq, h, d, device=DEVICE).transpose(1, 2)
    kv = torch.randn(b, lk, 2, hkv, d, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    lse_store = torch.full((b, lq, h), float("nan"), device=DEVICE)
    lse = lse_store.transpose(1, 2)
    lse_lo = torch.full_like(lse_store, float("nan")).transpose(1, 2)
    out, lse_out, _ = attention_ops.attention_forward(q, k, v, lk - lq, d**-0.5, lse=lse, lse_lo=lse_lo)
    assert lse_out.data_ptr() == lse_store.data_ptr() and out.stride(1) < out.stride(2)
    ref, same, floor = _oracles(q, k, v, torch.ones_like(out), True, d**-0.5)
    assert_close(out, same[0], ref[0], FACTOR_OUTPUT, "out", floor=floor[0])
    assert_close(lse, same[1], ref[1], FACTOR_OUTPUT, "lse", floor=floor[1])


@settings(max_examples=15, deadline=None)
@given(lq=st.integers(1, configs.DECODE_MAX_LQ), lk=st.integers(1, 160), group=st.sampled_from([1, 2, 3, 4]),
       d=st.sampled_from([8, 40, 64]), causal=st.booleans(), top_left=st.booleans(), min_keys=st.sampled_from([16, 48]))
def test_fuzz_decode_splits_and_masks(lq, lk, group, d, causal, top_left, min_keys):
    """Random query and key counts, groups and causal alignments with small forced splits: every placement of
    the causal edge relative to the split and block boundaries (unmasked bulk, masked edge, empty splits)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(configs, "DECODE_MIN_KEYS", min_keys)
        q, k, v = _qkv(1, 2 * group, 2, lq, lk, d, d, torch.float64)
        _run_and_check(q, k, v, causal, top_left)


@pytest.mark.parametrize("lk,programs,sms", [(4096, 16, 132), (4096, 264, 132), (100, 2, 132), (1, 1, 132),
                                             (131072, 1, 132), (5000, 8, 108), (257, 1, 132)])
def test_split_heuristic_covers_the_keys_and_fills_the_gpu(lk, programs, sms):
    block_n = 64
    splits, per = configs.decode_splits(lk, programs, block_n, sms)
    assert per % block_n == 0 and per > 0
    assert (splits - 1) * per < lk <= splits * per or (lk <= 1 and splits == 1)
    assert 1 <= splits <= configs.DECODE_MAX_SPLITS
    if splits > 1:
        assert per >= configs.DECODE_MIN_KEYS  # no split too short to pay for its partial
    if programs >= 2 * sms:
        assert splits == 1
    elif lk >= 2 * sms * configs.DECODE_MIN_KEYS:
        assert programs * splits >= 2 * sms or splits == configs.DECODE_MAX_SPLITS  # the GPU is filled


def test_decode_config_fits_packed_rows():
    """Packed rows rounded up to a power of two in [16, 32] (16-bit up to D = 128; 16 otherwise); keys 64
    on the tensor-core paths (wgmma's M), fewer on the FMA paths; the combine's rows fit 8 KiB tiles."""
    for rows, want in ((1, 16), (4, 16), (17, 32), (64, 32)):
        assert configs.decode_config(rows, 128, 128, 2)["BLOCK_M"] == want
    assert configs.decode_config(64, 256, 256, 2)["BLOCK_M"] == 16
    assert configs.decode_config(64, 128, 128, 4, "tf32")["BLOCK_M"] == 16
    assert configs.decode_config(4, 128, 128, 2)["BLOCK_N"] == 64
    assert configs.decode_config(4, 128, 128, 4, "tf32")["BLOCK_N"] == 64
    fma = configs.decode_config(64, 64, 64, 8)
    assert fma["BLOCK_M"] == 16 and fma["BLOCK_N"] == 32
    assert configs.decode_config(4, 256, 256, 4, "ieee")["BLOCK_N"] == 16
    assert configs.backward_precision("tf32", 256, 256) == "ieee"  # what the launcher gives the decode kernel
    assert configs.decode_combine_rows(64, 4) == 16 and configs.decode_combine_rows(256, 8) == 4


def test_row_statistics_padding_covers_every_block():
    """The padded row statistics of the TMA dK/dV loop (``ROW_STATS_ALIGN`` rows per multiple): every dK/dV
    TMA tile's query block and every preprocess tile divide it, so the loop's unmasked loads stay inside
    a head's rows and the preprocess grid writes every padded row."""
    align = configs.ROW_STATS_ALIGN
    for tile in configs.DKDV_TILES:
        if tile.tma:
            assert align % tile.block_m == 0, tile
    for d in range(1, configs.MAX_HEAD_DIM + 1):
        for nbytes in (2, 4, 8):
            assert align % configs.preprocess_config(d, nbytes)["BLOCK_M"] == 0
    assert align % configs.INTERPRETER_PREPROCESS_CONFIG["BLOCK_M"] == 0
    assert align % configs.INTERPRETER_BWD_CONFIG["BLOCK_M"] == 0


@pytest.mark.parametrize("offset", [2**31 - 1, 2**31 + 5, -(2**31), -7, 300])
def test_extreme_causal_offsets(offset):
    """Offsets at and past the int32 range: every key visible (>= Lk - 1), none (< -(Lq - 1)), or in
    between; the decoding launcher clamps them into [-Lq, Lk] (the same mask) before the kernel's int32
    bounds. Against the masked reference."""
    q, k, v = (t.detach() for t in _qkv(1, 4, 2, 3, 70, 16, 16, torch.float64))
    out, lse, lse_lo = attention_ops.attention_forward(q, k, v, offset, 0.25)
    i = torch.arange(3, device=DEVICE)[:, None]
    j = torch.arange(70, device=DEVICE)[None, :]
    visible = j <= i + offset
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = torch.where(visible, (q @ kk.transpose(-1, -2)) * 0.25, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.where(visible.any(-1)[:, None], torch.softmax(s, -1), 0.0).nan_to_num() @ vv
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-12)
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-12, rtol=1e-12)
