"""What the attention kernels add for the features beyond matching the references (test_attention_features.py
and test_attention_varlen.py check the numbers): feature calls run on the kernels (no torch twin), blocks
outside a sliding window are never read, and the dropout mask a kernel applies does not depend on its tiles.

Block skipping is a property of the kernels (the torch twin computes the whole score matrix), so those
tests run on the kernel backends only.
"""

import pytest
import torch

import gradkernels
from gradkernels import reference, testing
from gradkernels.kernels import attention_configs as configs
from test_attention_features import ACC, _oracles, _qkv, _run
from utils import DEVICE, assert_close, check_attention

FACTOR_OUT, FACTOR_GRAD = 2, 3
TWINS = ("attention_features_forward", "attention_features_backward", "attention_varlen_forward",
         "attention_varlen_backward")


def _kernels_only(t):
    if gradkernels.backend_for(t) == "torch":
        pytest.skip("block skipping is a property of the Triton kernels; the torch backend runs the twin")


def test_feature_calls_run_on_the_kernels(monkeypatch):
    """Dense and varlen calls with every feature, forward and backward, never reach the torch twins."""
    q, k, v = _qkv(1, 4, 2, 21, 27, 16, 16, torch.float32)
    _kernels_only(q)

    def twin(*args, **kwargs):
        raise AssertionError("a feature call ran the torch twin")

    for name in TWINS:
        monkeypatch.setattr(reference, name, twin)
    slopes = torch.rand(4, device=DEVICE) * 0.3 + 0.05
    feats = dict(causal=True, window_size=(6, -1), softcap=2.0, alibi_slopes=slopes, dropout_p=0.2)
    out = gradkernels.attention(q, k, v, **feats)
    out.sum().backward()
    cu_q = torch.tensor([0, 9, 9, 21], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 4, 15, 27], dtype=torch.int32, device=DEVICE)
    qv, kv, vv = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_(True) for t in (q, k, v))
    out = gradkernels.attention_varlen(qv, kv, vv, cu_q, cu_k, 12, 12, **feats)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (qv, kv, vv))


def _clean_oracles(q, k, v, grad_out, window):
    kw = dict(causal=True, window_size=window)
    ref = testing.attention_reference(q, k, v, grad_out, **kw)
    floor = testing.attention_bounds(q, k, v, grad_out, **kw)
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = testing.torch_attention(qq, kk, vv, **kw)
    same = dict(zip(("out", "dq", "dk", "dv"), (out, *torch.autograd.grad(out, (qq, kk, vv), grad_out))),
                lse=lse.detach())
    return ref, same, floor


def _poisoned(t, rows):
    """A copy of ``t`` (B, H, L, D) with NaN in positions ``rows``, as a new leaf."""
    t = t.detach().clone()
    t[:, :, rows] = float("nan")
    return t.requires_grad_(True)


def test_keys_left_of_the_window_are_never_read_by_forward_and_dq():
    """Causal window (8, 0) over 160 positions: query rows >= 128 see keys >= 120 only, so the key blocks
    [0, 64) (NaN here) must be skipped by the forward and dQ kernels (a visited block would spread NaN:
    0 * NaN = NaN in P V)."""
    length, window = 160, (8, 0)
    q, k, v = _qkv(1, 2, 1, length, length, 16, 16, torch.float32)
    _kernels_only(q)
    grad_out = torch.randn(1, 2, length, 16, device=DEVICE)
    ref, same, floor = _clean_oracles(q, k, v, grad_out, window)
    kn, vn = _poisoned(k, slice(0, 64)), _poisoned(v, slice(0, 64))
    out, lse = gradkernels.attention(q, kn, vn, causal=True, window_size=window, return_lse=True)
    (dq,) = torch.autograd.grad(out, (q,), grad_out)
    rows = slice(128, length)
    for name, ours in (("out", out), ("lse", lse), ("dq", dq)):
        factor = FACTOR_GRAD if name == "dq" else FACTOR_OUT
        assert_close(ours[:, :, rows], same[name][:, :, rows], ref[name][:, :, rows], factor, name,
                     floor=floor[name][:, :, rows])


def test_queries_right_of_the_window_are_never_read_by_dkdv():
    """Causal window (8, 0): keys < 64 are seen by query rows < 72 only, so the dK/dV kernel must skip the
    query blocks [128, 160) (NaN in Q and dO here) for those keys."""
    length, window = 160, (8, 0)
    q, k, v = _qkv(1, 2, 1, length, length, 16, 16, torch.float32)
    _kernels_only(q)
    grad_out = torch.randn(1, 2, length, 16, device=DEVICE)
    ref, same, floor = _clean_oracles(q, k, v, grad_out, window)
    qn = _poisoned(q, slice(128, length))
    gn = grad_out.clone()
    gn[:, :, 128:] = float("nan")
    out = gradkernels.attention(qn, k, v, causal=True, window_size=window)
    dk, dv = torch.autograd.grad(out, (k, v), gn)
    keys = slice(0, 64)
    for name, ours in (("dk", dk), ("dv", dv)):
        assert_close(ours[:, :, keys], same[name][:, :, keys], ref[name][:, :, keys], FACTOR_GRAD, name,
                     floor=floor[name][:, :, keys])


@pytest.mark.parametrize("tile", [{"BLOCK_M": 16, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 16}])
def test_dropout_mask_does_not_depend_on_the_kernel_tiles(tile, monkeypatch):
    """Other tiles than the interpreter's default 32 x 32 apply the same keep-mask (the reference uses the
    mask materialised by gradkernels.dropout_mask), forward and backward, with GQA."""
    q, k, v = _qkv(1, 4, 2, 37, 45, 16, 16, torch.float32)
    _kernels_only(q)
    monkeypatch.setattr(configs, "INTERPRETER_FWD_CONFIG", tile)
    monkeypatch.setattr(configs, "INTERPRETER_BWD_CONFIG", tile)
    grad_out = torch.randn(1, 4, 37, 16, device=DEVICE)
    feats = dict(causal=True, window_size=(20, -1), dropout_p=0.3)
    ours, mask = _run(q, k, v, grad_out, **feats)
    check_attention(ours, _oracles(q, k, v, grad_out, mask, **feats), ACC[torch.float32])
