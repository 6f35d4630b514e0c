"""The attention kernels' TMA tiles (Q, K, V and dO through tensor descriptors; sm_90+, fp16/bf16, plain
launches): the forward, dK/dV and dQ.

Under the interpreter the descriptor paths are run by pinning TMA tiles (the launcher then passes ``TMA``
to each kernel where the tensors allow it, and drops it where they do not); on a GPU the autotuner picks
among the TMA tiles the table lists for sm_90. Results are checked against the two oracles of
test_attention.py; the rules that decide where TMA tiles may run are checked directly.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradkernels
from gradkernels.kernels import attention_configs as configs
from gradkernels.ops import attention as attention_ops
from test_attention import _oracles, _qkv, _run_and_check
from utils import DEVICE, ON_GPU, check_attention

TMA_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "TMA": True}
# The dK/dV TMA loop has two layouts (kernels/attention_dkdv.py, _attn_bwd_dkdv_tma): scores as (queries x
# keys) where BLOCK_M >= BLOCK_N (32 x 32, 64 x 32), transposed otherwise (32 x 64: its diagonal blocks
# are 16 rows high).
TMA_TILES = [TMA_TILE, {"BLOCK_M": 32, "BLOCK_N": 64, "TMA": True}, {"BLOCK_M": 64, "BLOCK_N": 32, "TMA": True}]
KERNELS = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")


class _Recorder:
    """Stands in for the attention kernels in the launcher: records each launch's ``(kernel, TMA_OK, TMA)``
    and runs it."""

    def __init__(self):
        self.launches = []

    def wrap(self, name, kernel):
        recorder = self

        class Wrapped:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    tma_ok = args[kernel.arg_names.index("TMA_OK")]
                    recorder.launches.append((name, tma_ok, kwargs.get("TMA", False)))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Wrapped()


def _pin_tma(monkeypatch, tile=TMA_TILE):
    """Pin TMA tiles for the interpreter's launches and record what the kernels are handed."""
    monkeypatch.setattr(configs, "INTERPRETER_FWD_CONFIG", tile)
    monkeypatch.setattr(configs, "INTERPRETER_BWD_CONFIG", tile)
    recorder = _Recorder()
    for name in KERNELS:
        monkeypatch.setattr(attention_ops.kernels, name, recorder.wrap(name, getattr(attention_ops.kernels, name)))
    return recorder


def _kernels(lq):
    """The recorded kernels a forward and backward of ``lq`` query rows launch: decoding lengths run their
    forward on the split-KV kernel (tests/test_attention_decode.py), which has no TMA tiles."""
    return KERNELS[1:] if configs.use_decode(lq) else KERNELS


# (B, Hq, Hkv, Lq, Lk, D, Dv, causal, top_left, layout): odd lengths (partial blocks read past the end
# through the descriptors), head dims below the 64-wide block (columns past D read as zeros), GQA (the dK/dV
# kernel's 3-D descriptors over the group's heads), rows with no key, (B, L, H, D) storage.
CASES = [
    (1, 2, 2, 37, 53, 64, 64, False, False, "bhld"),
    (1, 2, 2, 97, 97, 40, 40, True, False, "bhld"),
    (1, 4, 2, 53, 37, 80, 80, True, False, "bhld"),  # GQA; bottom-right with Lq > Lk: 16 rows see no key
    (1, 2, 1, 113, 129, 64, 48, True, True, "bhld"),  # MQA, top-left, Dv != D
    (2, 1, 1, 17, 257, 128, 128, True, False, "bhld"),  # one query row past the decoding kernel's lengths
    (2, 4, 2, 45, 45, 64, 64, True, False, "blhd"),  # head-interleaved rows of 4 x 64 x 2 bytes
]


@pytest.mark.parametrize("tile", TMA_TILES[:2], ids=["rows", "transposed"])
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,dv,causal,top_left,layout", CASES)
def test_tma_tiles_match_the_reference(b, hq, hkv, lq, lk, d, dv, causal, top_left, layout, tile, monkeypatch):
    recorder = _pin_tma(monkeypatch, tile)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv, torch.float16, layout=layout)
    _run_and_check(q, k, v, causal, top_left)
    if gradkernels.backend_for(q) != "torch" and not ON_GPU:
        assert recorder.launches == [(name, 1, True) for name in _kernels(lq)], "a kernel did not run its TMA path"


@settings(max_examples=20, deadline=None)
@given(lq=st.integers(1, 100), lk=st.integers(1, 100), d=st.sampled_from([8, 24, 40, 64, 72]),
       group=st.sampled_from([1, 2, 3]), causal=st.booleans(), top_left=st.booleans(),
       tile=st.sampled_from(TMA_TILES))
def test_fuzz_tma_block_ranges(lq, lk, d, group, causal, top_left, tile):
    """Random lengths around the pinned tiles (both dK/dV layouts) and both causal alignments: the dK/dV
    TMA loop's split into masked diagonal blocks and unmasked bulk blocks, and the forward/dQ key ranges,
    for every offset."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = _pin_tma(monkeypatch, tile)
        q, k, v = _qkv(1, group, 1, lq, lk, d, d, torch.float16)
        _run_and_check(q, k, v, causal, top_left)
    if gradkernels.backend_for(q) != "torch" and not ON_GPU:
        assert [tma for _, _, tma in recorder.launches] == [True] * len(_kernels(lq))


def test_tensors_tma_cannot_read_run_the_pointer_path(monkeypatch):
    """A pinned TMA tile is dropped where the descriptors' rules fail (here a (B, L, H, D) layout whose
    row stride, 3 heads x 36 x 2 bytes, is not a multiple of 16 bytes): same results, no TMA."""
    recorder = _pin_tma(monkeypatch)
    q, k, v = _qkv(1, 3, 3, 37, 45, 36, 36, torch.float16, layout="blhd")
    assert not configs.tma_compatible(q, k, v)
    grad_out = torch.randn(1, 3, 37, 36, device=DEVICE, dtype=torch.float16)
    out, lse = gradkernels.autograd.attention(q, k, v, 45 - 37, 1 / math.sqrt(36))
    ours = (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out))
    check_attention(ours, _oracles(q, k, v, grad_out, True, 1 / math.sqrt(36)), torch.float32)
    if gradkernels.backend_for(q) != "torch" and not ON_GPU:
        assert recorder.launches == [(name, 0, False) for name in KERNELS]


def _t(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_tma_compatible_follows_the_descriptor_rules():
    assert configs.tma_compatible(_t(2, 4, 100, 64), _t(2, 4, 100, 40))
    assert configs.tma_compatible(_t(2, 100, 4, 64).transpose(1, 2))  # (B, L, H, D): 512-byte rows
    assert not configs.tma_compatible(_t(2, 4, 100, 64, dtype=torch.float32))  # 16-bit tiles only
    assert not configs.tma_compatible(_t(2, 4, 100, 256))  # head dims above 128: no TMA tiles
    assert not configs.tma_compatible(_t(2, 4, 64, 100).transpose(2, 3))  # last dim not contiguous
    assert not configs.tma_compatible(_t(2, 4, 100, 36))  # 72-byte rows
    assert not configs.tma_compatible(_t(2, 4, 100, 64)[..., :4])  # 8-byte rows, though 128-byte strides
    assert not configs.tma_compatible(_t(2, 3, 100, 40)[..., 4:])  # 80-byte rows, base 8 bytes in
    base = torch.empty(2 * 4 * 100 * 64 + 1, dtype=torch.float16)
    assert not configs.tma_compatible(base[1:].view(2, 4, 100, 64))  # base address off by 2 bytes


def _fwd_args(**kw):
    args = {"HEAD_D": 128, "HEAD_DV": 128, "LQ_BUCKET": 4096, "LK_BUCKET": 4096, "INPUT_PRECISION": "ieee",
            "TMA_OK": 1}
    return {**args, **kw}


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_prune_offers_tma_tiles_only_where_they_may_run(kernel):
    """sm_90, 16-bit, plain launch with TMA_OK: TMA tiles are offered (for the forward the largest kept tile is
    a 128 x 128 TMA one); without TMA_OK, on sm_80, for fp32 or with a feature flag: none."""
    tiles = configs.get_attn_fwd_configs() if kernel == "fwd" else configs.get_attn_bwd_configs()[kernel]

    def tma_tiles(args, dtype_bytes=2, arch=90):
        kept = configs.prune(tiles, args, kernel=kernel, dtype_bytes=dtype_bytes, arch=arch)
        return [configs.Tile.of(c) for c in kept if c.kwargs.get("TMA")]

    picked = tma_tiles(_fwd_args())
    assert picked
    if kernel == "fwd":
        assert (picked[0].block_m, picked[0].block_n) == (128, 128)
    assert tma_tiles(_fwd_args(TMA_OK=0)) == []
    assert tma_tiles(_fwd_args(), arch=80) == []
    assert tma_tiles(_fwd_args(), dtype_bytes=4) == []
    assert tma_tiles(_fwd_args(HAS_SOFTCAP=True)) == []
    for c in tiles:
        if c.kwargs.get("TMA"):
            assert not configs.keep(c, 256, 2, 90, kernel=kernel), "no TMA tiles above D = 128"
            assert not configs.keep(c, 128, 2, 80, kernel=kernel), "no TMA before sm_90"


@pytest.mark.parametrize("tile", TMA_TILES[:2], ids=["rows", "transposed"])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_backward_applies_the_lse_residual(causal, tile, monkeypatch):
    """The TMA dQ loop leaves each row's LSE residual out of P and scales the dQ row by ``exp2(-lo)`` once;
    the dK/dV loop leaves it out too and reads the preprocess's ``dO' = exp2(-lo) dO`` and ``Delta'``
    instead (checked by mutation: dropping the factor from dO', or taking Delta' from dO, fails). Handed an LSE rounded 0.25 off with the residual that puts it
    back (``split_lse``'s contract: ``exact = (fl(lse * log2 e) + lo) * ln 2``), the TMA backward must give
    the gradients of the exact LSE; a kernel that dropped or misapplied the residual would be off by a
    factor e^0.25 in P."""
    recorder = _pin_tma(monkeypatch, tile)
    q, k, v = _qkv(1, 4, 2, 45, 53, 64, 64, torch.float16)
    grad_out = torch.randn(1, 4, 45, 64, device=DEVICE, dtype=torch.float16)
    scale, offset = 1 / 8, (53 - 45 if causal else None)
    out, lse, lse_lo = attention_ops.attention_forward(q.detach(), k.detach(), v.detach(), offset, scale)
    exact = attention_ops.exact_lse(lse, lse_lo)
    shifted = (exact + 0.25).to(lse.dtype)
    lo = exact * attention_ops._LOG2E - (shifted * attention_ops._LOG2E).double()
    assert lo.abs().min().item() > 0.3  # the residual carries 0.25 / ln 2 of the LSE
    recorder.launches.clear()
    dq, dk, dv = attention_ops.attention_backward(grad_out, q.detach(), k.detach(), v.detach(), out, shifted,
                                                  lo.to(lse_lo.dtype), offset, scale)
    check_attention((out, lse, dq, dk, dv), _oracles(q, k, v, grad_out, causal, scale), torch.float32)
    if gradkernels.backend_for(q) != "torch" and not ON_GPU:
        assert recorder.launches == [(name, 1, True) for name in KERNELS[1:]]


def test_preprocess_writes_what_the_dkdv_tma_loop_reads():
    """The Delta preprocess's ``ROW_STATS`` outputs, against torch: ``dO' = exp2(-lo) * dO`` rounded to dO's
    dtype (dO bit for bit where the residual is too small to move it), ``-hi`` (``hi = LSE * log2 e``;
    -inf for a row that saw no key and for the padding rows) and ``Delta' = rowsum(dO' * O)`` (0 in the
    padding), laid out as ``(B * H, LQ_PAD, Dv rounded up to 8)`` and ``(B * H, 2, LQ_PAD)``; Delta itself
    stays ``rowsum(dO * O)`` for the dQ kernel."""
    b, h, lq, dv = 2, 3, 45, 36
    lq_pad, dv_pad = configs.ROW_STATS_ALIGN, 40
    gen = torch.Generator().manual_seed(7)
    o = torch.randn(b, h, lq, dv, generator=gen).to(DEVICE, torch.float16)
    do = torch.randn(b, h, lq, dv, generator=gen).to(DEVICE, torch.float16)
    lse = (torch.randn(b, h, lq, generator=gen) * 3).to(DEVICE)
    lo = torch.zeros(b, h, lq, device=DEVICE)
    lo[:, :, ::2] = (torch.rand(b, h, (lq + 1) // 2, generator=gen).to(DEVICE) - 0.5) * 2**-5  # large logits
    lo[:, :, 1::4] = 2**-20  # a residual too small to change any fp16 dO
    lse[0, 1, 5], lo[0, 1, 5] = float("-inf"), 0.0  # a row that saw no key
    delta = torch.empty(b, h, lq, device=DEVICE)
    stats = torch.full((b * h * 2 * lq_pad,), float("nan"), device=DEVICE)
    do_s = torch.full((b * h * lq_pad * dv_pad,), float("nan"), device=DEVICE, dtype=torch.float16)
    block_m = configs.INTERPRETER_PREPROCESS_CONFIG["BLOCK_M"]
    attention_ops.kernels.attn_bwd_preprocess_kernel[(lq_pad // block_m * b * h,)](
        o, do, delta, lse, lo, stats, do_s, h, lq, lq_pad, *o.stride(), *do.stride(), *delta.stride(), *lse.stride(),
        HEAD_DV=dv, BLOCK_DV=configs.head_block(dv), ROW_STATS=True, BLOCK_M=block_m, num_warps=4,
    )
    do_s = do_s.view(b, h, lq_pad, dv_pad)
    stats = stats.view(b, h, 2, lq_pad)
    want_do_s = (do.float() * torch.exp2(-lo)[..., None]).half()
    torch.testing.assert_close(do_s[:, :, :lq, :dv], want_do_s, rtol=2**-10, atol=0)
    assert torch.equal(do_s[:, :, 1:lq:4, :dv], do[:, :, 1::4])
    assert (do_s[:, :, :lq:2, :dv] != do[:, :, ::2]).any()  # the residual did scale dO
    assert torch.equal(do_s[:, :, lq:, :dv], torch.zeros_like(do_s[:, :, lq:, :dv]))
    want_hi = torch.where(lse == float("-inf"), float("inf"), lse * attention_ops._LOG2E)
    torch.testing.assert_close(stats[:, :, 0, :lq], -want_hi, rtol=1e-6, atol=0)
    assert stats[0, 1, 0, 5] == float("-inf") and (stats[:, :, 0, lq:] == float("-inf")).all()
    torch.testing.assert_close(stats[:, :, 1, :lq], (do_s[:, :, :lq, :dv].float() * o.float()).sum(-1),
                               rtol=1e-5, atol=1e-5)
    assert (stats[:, :, 1, lq:] == 0).all()
    torch.testing.assert_close(delta, (do.float() * o.float()).sum(-1), rtol=1e-5, atol=1e-5)
