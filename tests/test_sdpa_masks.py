"""The SDPA drop-in with boolean masks: key-padding masks (alone, or with a causal mask: left or right
padding) run on gradkernels as varlen over the real keys, with torch's semantics for every row (padded
query rows included); every other mask goes to torch, and the path is counted and logged.

Oracles: torch's own SDPA in fp64 (the reference) and in fp32 (its error scale), with the mask; fp32
under test, floor of a few units of rounding (no derived bound for an arbitrary mask).
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels import custom_ops, functional
from utils import DEVICE, assert_close


@pytest.fixture
def ops(monkeypatch):
    calls = []
    for name in ("attention_fwd", "attention_features_fwd", "attention_varlen_fwd"):
        op = getattr(custom_ops, name)
        monkeypatch.setattr(custom_ops, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    return calls


def _keep(kind, b, lk, gen):
    """(B, Lk) real-key marks: "holes" anywhere, "left" (a suffix), "right" (a prefix); one sequence
    unpadded and one with a single real key."""
    lengths = [lk, 1] + [int(torch.randint(2, lk, (1,), generator=gen)) for _ in range(b - 2)]
    keep = torch.zeros(b, lk, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if kind == "left":
            keep[i, lk - n:] = True
        elif kind == "right":
            keep[i, :n] = True
        else:
            keep[i, torch.randperm(lk, generator=gen)[:n]] = True
    return keep.to(DEVICE)


CASES = [
    # (kind, causal, Lq, Lk, mask shape)
    ("holes", False, 13, 17, "b1qk"),
    ("holes", False, 13, 17, "b11k"),  # broadcast over the query rows too
    ("left", True, 17, 17, "b1qk"),
    ("right", True, 17, 17, "b1qk"),
    ("left", True, 7, 17, "b1qk"),  # Lq < Lk: bottom-right causal (a KV cache with padding)
    ("right", True, 7, 17, "bhqk"),  # per-head copies of one mask
]


@pytest.mark.parametrize("kind,causal,lq,lk,shape", CASES)
def test_padding_masks_run_as_varlen_with_torch_semantics(kind, causal, lq, lk, shape, ops):
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, d = 4, 4, 2, 16
    keep = _keep(kind, b, lk, gen)
    mask = keep[:, None, None, :].expand(b, 1, lq, lk)
    if causal:
        mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril(lk - lq)
    if shape == "b11k":
        mask = keep[:, None, None, :]
    elif shape == "bhqk":
        mask = mask.expand(b, hq, lq, lk).clone()
    q = torch.randn(b, hq, lq, d, device=DEVICE, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, device=DEVICE, requires_grad=True)
    grad = torch.randn(b, hq, lq, d, device=DEVICE)
    before = functional.sdpa_paths.copy()
    out = gradkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert functional.sdpa_paths - before == {"key padding -> varlen": 1}
    assert ops and set(ops) == {"attention_varlen_fwd"}
    ours = (out, *torch.autograd.grad(out, (q, k, v), grad))

    def theirs(dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
        return (o, *torch.autograd.grad(o, (qq, kk, vv), grad.to(dtype)))

    ref, same = theirs(torch.float64), theirs(torch.float32)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close(ours[i], same[i], ref[i], 2 if i == 0 else 3, name)


@pytest.mark.parametrize("what,reason", [
    ("middle", "causal mask with key padding in the middle"),
    ("heads", "attn_mask differs between heads"),
    ("query_padding", "not a key-padding mask"),
    ("float", "not a boolean tensor"),
])
def test_other_masks_go_to_torch(what, reason, ops, caplog):
    b, h, lq, lk = 2, 2, 9, 9
    keep = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    keep[0, 3:5] = False
    causal = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril()
    mask = {
        "middle": causal & keep[:, None, None, :],
        "heads": torch.stack([keep[:, None, :].expand(b, lq, lk), causal.expand(b, lq, lk)], 1),
        "query_padding": keep[:, None, :, None] & keep[:, None, None, :],
        "float": torch.zeros(b, 1, lq, lk, device=DEVICE),
    }[what]
    q, k, v = (torch.randn(b, h, lq, 8, device=DEVICE) for _ in range(3))
    with caplog.at_level(logging.DEBUG, logger="gradkernels"):
        ours = gradkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ops == [] and reason in caplog.text
    assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_masked_call_under_patch_counts_its_path():
    from gradkernels import patching

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    model = Attn()
    q, k, v = (torch.randn(2, 2, 5, 8, device=DEVICE) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]], device=DEVICE)
    patching.patch(model)
    try:
        before = patching.attention_paths()
        model(q, k, v, keep[:, None, None, :])
        model(q, k, v, None)
        taken = patching.attention_paths() - before
    finally:
        patching.unpatch(model)
    assert taken == {"key padding -> varlen": 1, "kernels": 1}
