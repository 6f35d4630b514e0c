"""Attention dropout's keep-mask: the Philox stream, the counter layout, the Triton helpers against the torch
implementation bit for bit, tile independence, the keep rate, seeds from torch's generator, and the mask a
call actually applies (seen through its output).

Independent checks of the generator: Random123's published Philox4x32-10 answers, and a pure-Python
(integer) Philox that evaluates the documented counter layout for single elements.
"""

import math

import pytest
import torch

import gradkernels
from gradkernels import dropout as gkd
from gradkernels._device import backend_for
from gradkernels.ops import dropout as dropout_ops
from utils import DEVICE

ON_KERNELS = backend_for(torch.empty(1, device=DEVICE)) != "torch"
needs_kernels = pytest.mark.skipif(not ON_KERNELS, reason="the Triton mask kernel needs a GPU or the interpreter")

# Random123's known-answer tests (kat_vectors): philox4x32, 10 rounds: counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_torch_philox_gives_random123_known_answers(counter, key, expected):
    words = gkd.philox4x32(*(torch.tensor(c) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def _python_philox(counter, key):
    """Philox4x32-10 on Python ints, from Salmon et al. 2011 (test-side, independent of the library)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF, ((p0 >> 32) ^ c3 ^ k1) & 0xFFFFFFFF, \
            p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def test_mask_follows_the_documented_counter_layout():
    """keep(b, h, i, j) = word j & 3 of Philox((j >> 2, i, b * H + h, offset), (seed lo, seed hi)) >= T."""
    seed, offset, p = 0x0123456789ABCDEF, 77, 0.35
    b_, h_, lq, lk = 2, 3, 9, 13
    mask = gradkernels.dropout_mask(b_, h_, lq, lk, p, seed, offset)
    t = math.ceil(p * 2**32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        b, h, i, j = (int(torch.randint(0, n, (1,), generator=gen)) for n in (b_, h_, lq, lk))
        words = _python_philox((j >> 2, i, b * h_ + h, offset), (seed & 0xFFFFFFFF, seed >> 32))
        assert bool(mask[b, h, i, j]) == (words[j & 3] >= t), (b, h, i, j)


@needs_kernels
@pytest.mark.parametrize("block,quads,p", [((32, 64), True, 0.1), ((16, 16), True, 0.5), ((64, 4), True, 0.97),
                                           ((16, 32), False, 0.3), ((32, 8), False, 0.97)])
def test_triton_mask_equals_torch_mask_bitwise_at_any_tile(block, quads, p):
    """The kernel's helpers (one Philox per key, or per four keys) give the torch mask bit for bit, at
    tile shapes that do and do not divide the sizes."""
    rng = torch.tensor([0x7EDCBA9876543210, 2**40 + 5], dtype=torch.int64, device=DEVICE)  # offset mod 2^32
    ours = dropout_ops.dropout_mask(2, 3, 37, 53, p, rng, block=block, quads=quads)
    theirs = gradkernels.dropout_mask(2, 3, 37, 53, p, rng[0], rng[1])
    assert ours.dtype == torch.bool and torch.equal(ours, theirs)


def test_keep_rate_and_independence():
    """Keep rate 1 - p within 5 standard deviations, for the whole mask and for each head, and neighbouring
    keys (within one Philox call, and across calls) are uncorrelated."""
    p = 0.3
    mask = gradkernels.dropout_mask(2, 4, 64, 128, p, seed=2024, offset=0).double()
    n = mask.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - (1 - p)) < 5 * sd
    per_head = mask.mean(dim=(2, 3))
    sd_head = math.sqrt(p * (1 - p) / (64 * 128))
    assert ((per_head - (1 - p)).abs() < 5 * sd_head).all()
    x = mask - mask.mean()
    for lag in (1, 4):  # j and j + 1 share a Philox call (mostly), j and j + 4 do not
        corr = (x[..., :-lag] * x[..., lag:]).mean() / x.var()
        assert abs(corr.item()) < 5 / math.sqrt(x[..., lag:].numel())


def test_seeds_offsets_and_positions_all_change_the_mask():
    base = gradkernels.dropout_mask(1, 2, 16, 16, 0.5, seed=1, offset=0)
    assert not torch.equal(base, gradkernels.dropout_mask(1, 2, 16, 16, 0.5, seed=2, offset=0))
    assert not torch.equal(base, gradkernels.dropout_mask(1, 2, 16, 16, 0.5, seed=1, offset=1))
    assert not torch.equal(base[0, 0], base[0, 1])  # heads
    assert not torch.equal(base[0, 0, 0], base[0, 0, 1])  # rows
    # Seeds and offsets are taken mod 2^64 and mod 2^32, as the kernels' casts take them.
    assert torch.equal(base, gradkernels.dropout_mask(1, 2, 16, 16, 0.5, seed=1 + 2**64, offset=2**32))


def test_varlen_masks_are_the_dense_masks_of_each_sequence():
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 9, 11], dtype=torch.int32, device=DEVICE)
    masks = gradkernels.dropout_mask_varlen(cu_q, cu_k, 2, 0.4, seed=9, offset=3)
    dense = gradkernels.dropout_mask(3, 2, 7, 5, 0.4, seed=9, offset=3, device=DEVICE)
    assert [tuple(m.shape) for m in masks] == [(2, 3, 5), (2, 0, 4), (2, 7, 2)]
    for s, m in enumerate(masks):
        assert torch.equal(m, dense[s, :, :m.shape[1], :m.shape[2]])


def test_seeds_come_from_the_default_generator():
    torch.manual_seed(7)
    a = gkd.new_rng_state(DEVICE)
    b = gkd.new_rng_state(DEVICE)
    torch.manual_seed(7)
    assert torch.equal(a, gkd.new_rng_state(DEVICE)) and not torch.equal(a, b)
    assert a.dtype == torch.int64 and a.shape == (2,) and a.device.type == torch.device(DEVICE).type


def _observed_keep(out, lk):
    """With v the identity (Dv = Lk), out[..., j] = P_ij * keep_ij / (1 - p): nonzero exactly where kept
    (P > 0 for every visible key)."""
    return out != 0


@pytest.mark.parametrize("d", [16, 40])
def test_the_applied_mask_is_dropout_mask_whatever_the_head_dim(d):
    """Through the output: the keep-mask a dense call applies is ``dropout_mask`` of its seed, for any head
    dim and GQA (the mask depends on (seed, b, h, i, j) only)."""
    b, hq, hkv, lq, lk, p = 2, 4, 2, 19, 23, 0.4
    q = torch.randn(b, hq, lq, d, device=DEVICE)
    k = torch.randn(b, hkv, lk, d, device=DEVICE)
    v = torch.eye(lk, device=DEVICE).expand(b, hkv, lk, lk)
    torch.manual_seed(11)
    rng = gkd.new_rng_state(DEVICE)
    torch.manual_seed(11)
    out = gradkernels.attention(q, k, v, dropout_p=p)
    expected = gradkernels.dropout_mask(b, hq, lq, lk, p, rng[0], rng[1], device=DEVICE)
    assert torch.equal(_observed_keep(out, lk), expected)


def test_the_applied_varlen_mask_is_dropout_mask_varlen():
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32, device=DEVICE)
    lk = 12
    q = torch.randn(20, 2, 16, device=DEVICE)
    k = torch.randn(20, 1, 16, device=DEVICE)
    v = torch.cat([torch.eye(n, lk, device=DEVICE) for n in (7, 1, 12)])[:, None, :]
    torch.manual_seed(3)
    rng = gkd.new_rng_state(DEVICE)
    torch.manual_seed(3)
    out = gradkernels.attention_varlen(q, k, v, cu, cu, 12, 12, dropout_p=0.5, causal=True)
    masks = gradkernels.dropout_mask_varlen(cu, cu, 2, 0.5, rng[0], rng[1])
    for s, (a, c) in enumerate(((0, 7), (7, 8), (8, 20))):
        n = c - a
        seen = out[a:c, :, :n].transpose(0, 1) != 0
        causal = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
        assert torch.equal(seen, masks[s] & causal)


def test_dropout_is_reproducible_after_manual_seed_and_changes_between_calls():
    q, k, v = (torch.randn(1, 2, 13, 8, device=DEVICE) for _ in range(3))
    torch.manual_seed(5)
    a = gradkernels.attention(q, k, v, dropout_p=0.2)
    b = gradkernels.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(5)
    assert torch.equal(a, gradkernels.attention(q, k, v, dropout_p=0.2))
    assert not torch.equal(a, b)


def test_sdpa_drop_in_runs_dropout_on_gradkernels(monkeypatch):
    """The SDPA drop-in keeps calls with dropout_p > 0 (no hand-over to torch); the expected output over
    masks is the undropped one (checked at many seeds on a tiny problem)."""
    from gradkernels import custom_ops

    seen = []
    fwd = custom_ops.attention_features_fwd
    monkeypatch.setattr(custom_ops, "attention_features_fwd", lambda *a: seen.append(a[9]) or fwd(*a))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: pytest.fail("handed to torch"))
    q, k, v = (torch.randn(1, 1, 3, 4, device=DEVICE, dtype=torch.float64) for _ in range(3))
    outs = torch.stack([gradkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
                        for _ in range(200)])
    assert seen == [0.25] * 200
    plain = gradkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Each output is a sum of <= 3 terms P_ij v_j keep_ij / 0.75: its mean over 200 draws is within
    # 5 standard errors of the undropped output.
    se = outs.std(0) / math.sqrt(200)
    assert ((outs.mean(0) - plain).abs() <= 5 * se + 1e-12).all()
