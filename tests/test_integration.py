"""gradkernels.patch / unpatch / use_kernels on real models; activation checkpointing and autocast.

Every numeric check is the two-oracle rule (gradkernels.testing.assert_close): the patched model against
an fp64 copy of the plain model, with the plain model in the same dtype giving the error scale.
"""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkernels import patching
from gradkernels import reference, testing
from gradkernels.ops import attention as attention_ops
from gradkernels.nn import Linear as GKLinear
from gradkernels.models import TinyLM, TinyLMConfig, make_batches

from utils import DEVICE, ON_GPU, assert_close

patch, unpatch, use_kernels = patching.patch, patching.unpatch, patching.use_kernels

LINEAR_NAMES = sorted(
    [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"]
    + [f"blocks.{i}.{p}" for i in range(2) for p in ("up", "down")]
    + ["lm_head"]
)


def _three_models(cfg, dtype, *, checkpoint=False, seed=0):
    """(plain in dtype, patched-to-be in dtype, plain fp64): identical initial weights."""
    torch.manual_seed(seed)
    base = TinyLM(cfg, checkpoint=checkpoint).to(DEVICE)
    return copy.deepcopy(base).to(dtype), copy.deepcopy(base).to(dtype), copy.deepcopy(base).double()


def _loss_and_grads(model, inputs, targets, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_model(plain, ours, ref, batch, autocast_dtype=None):
    inputs, targets = batch
    out_t, g_t = _loss_and_grads(plain, inputs, targets, autocast_dtype)
    out_o, g_o = _loss_and_grads(ours, inputs, targets, autocast_dtype)
    out_r, g_r = _loss_and_grads(ref, inputs, targets)
    assert_close(out_o, out_t, out_r, 2, "logits")
    for name in g_r:
        assert_close(g_o[name], g_t[name], g_r[name], 3, f"grad {name}")


@pytest.fixture
def attn_launches(monkeypatch):
    """Counts launches of the attention forward kernel."""
    calls = []
    fwd = attention_ops.attention_forward

    def counting(*args, **kwargs):
        calls.append(args[3])  # causal_offset
        return fwd(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "attention_forward", counting)
    return calls


# ----------------------------------------------------------------------------------------------------
# patch / unpatch: module replacement
# ----------------------------------------------------------------------------------------------------


def test_patch_replaces_linears_sharing_parameters():
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig()).to(DEVICE)
    params_before = dict(model.named_parameters())
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    ptr_before = {k: v.data_ptr() for k, v in model.state_dict().items()}

    summary = patch(model, attention=False)

    assert sorted(summary.linear_replaced) == LINEAR_NAMES
    assert summary.linear_skipped == () and not summary.attention_routed
    for name in LINEAR_NAMES:
        assert type(model.get_submodule(name)) is GKLinear, name
    # The very same Parameter objects (an optimizer built before patching keeps working).
    assert all(p is params_before[n] for n, p in model.named_parameters())
    sd = model.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], sd_before[k]) and sd[k].data_ptr() == ptr_before[k] for k in sd)
    assert patching.is_patched(model)
    assert "13 Linear replaced" in str(summary)


def test_patched_model_matches_fp64_reference_fwd_bwd(attn_launches):
    cfg = TinyLMConfig()
    plain, ours, ref = _three_models(cfg, torch.float32)
    patch(ours)
    (batch,) = make_batches(cfg, 1, 2, 37, device=DEVICE)
    _check_model(plain, ours, ref, batch)
    assert len(attn_launches) == cfg.n_layers


def test_unpatch_restores_original_modules():
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig()).to(DEVICE)
    originals = {n: model.get_submodule(n) for n in LINEAR_NAMES}
    model.eval()  # mode changes made while patched carry over to the restored modules
    patch(model)
    new_weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.lm_head.weight = new_weight  # reassigned while patched: the original must get it
    summary = unpatch(model)

    assert sorted(summary.linear_replaced) == LINEAR_NAMES and summary.undone
    assert "13 Linear restored" in str(summary)
    for n in LINEAR_NAMES:
        assert model.get_submodule(n) is originals[n], n
        assert type(originals[n]) is nn.Linear and not originals[n].training
    assert model.lm_head.weight is new_weight
    assert not patching.is_patched(model)
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_patch_skips_what_it_cannot_replace():
    from torch.nn.utils import parametrize

    class MyLinear(nn.Linear):
        pass

    class Scale(nn.Module):
        def forward(self, w):
            return w * 2

    shared = nn.Linear(6, 6)
    model = nn.ModuleDict(
        {
            "plain": nn.Linear(6, 6),
            "sub": MyLinear(6, 6),
            "param": nn.Linear(6, 6),
            "hooked": nn.Linear(6, 6),
            "mha": nn.MultiheadAttention(6, 2),  # out_proj is NonDynamicallyQuantizableLinear
            "a": shared,
            "b": nn.Sequential(shared),
        }
    )
    parametrize.register_parametrization(model["param"], "weight", Scale())
    model["hooked"].register_forward_hook(lambda m, i, o: None)

    summary = patch(model, attention=False)

    assert sorted(summary.linear_replaced) == ["a", "b.0", "plain"]
    # One module reachable from two places stays one module (sharing preserved).
    assert model["a"] is model["b"][0] and isinstance(model["a"], GKLinear)
    skipped = dict(summary.linear_skipped)
    assert set(skipped) == {"sub", "param", "hooked", "mha.out_proj"}
    assert "subclass" in skipped["sub"] and "parametrizations" in skipped["param"]
    assert "hooks" in skipped["hooked"] and "subclass" in skipped["mha.out_proj"]
    assert type(model["sub"]) is MyLinear and parametrize.is_parametrized(model["param"])


def test_patch_keeps_weight_tying():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 8)
    head = nn.Linear(8, 11, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    patch(model, attention=False)
    assert model[1].weight is model[0].weight
    assert list(model.state_dict()) == ["0.weight", "1.weight"]


def test_patch_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch("model")
    with pytest.raises(TypeError, match="linear must be a bool"):
        patch(nn.Linear(2, 2), linear=1)
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch(model)
    patch(model, attention=False)
    with pytest.raises(RuntimeError, match="already patched"):
        patch(model)
    unpatch(model)


# ----------------------------------------------------------------------------------------------------
# SDPA routing
# ----------------------------------------------------------------------------------------------------


def _qkv(dtype=torch.float32, lq=37, lk=37):
    q = torch.randn(2, 4, lq, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, lk, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, lk, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v


def test_use_kernels_routes_sdpa_and_restores(attn_launches):
    torch_sdpa = F.scaled_dot_product_attention
    q, k, v = _qkv(lq=23)
    with use_kernels():
        assert patching.routing_active()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert F.scaled_dot_product_attention is torch_sdpa and not patching.routing_active()
    # torch's is_causal is top-left aligned: offset 0 reaches the kernel.
    assert attn_launches == [0]
    same = torch_sdpa(q, k, v, is_causal=True, enable_gqa=True)
    ref = reference.standard_attention(q.double(), k.double(), v.double(), causal=True, align="top_left")
    floor = testing.attention_bounds(q, k, v, causal=True, align="top_left")["out"]
    assert_close(out.detach(), same.detach(), ref.detach(), 2, floor=floor)


def test_use_kernels_nesting_and_exceptions():
    torch_sdpa = F.scaled_dot_product_attention
    with use_kernels():
        with use_kernels():
            assert patching.routing_active()
        assert patching.routing_active(), "the inner exit must not end the outer block's routing"
    assert F.scaled_dot_product_attention is torch_sdpa
    with pytest.raises(ZeroDivisionError):
        with use_kernels():
            1 / 0
    assert F.scaled_dot_product_attention is torch_sdpa and not patching.routing_active()


def test_use_kernels_hands_masks_to_torch(attn_launches):
    """A mask goes back to torch's function (through the router, without recursing into gradkernels)."""
    q, k, v = _qkv(lq=19)
    mask = torch.rand(19, 37, device=DEVICE) > 0.3
    with use_kernels():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert attn_launches == []
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


def test_patch_routes_only_the_models_calls(attn_launches):
    cfg = TinyLMConfig()
    torch.manual_seed(0)
    model = TinyLM(cfg).to(DEVICE)
    summary = patch(model, linear=False)
    assert summary.attention_routed and summary.linear_replaced == ()
    q, k, v = _qkv()
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # outside the model: torch
    assert attn_launches == []
    (batch,) = make_batches(cfg, 1, 1, 7, device=DEVICE)
    model(batch[0])
    assert attn_launches == [0] * cfg.n_layers
    unpatch(model)
    model(batch[0])
    assert len(attn_launches) == cfg.n_layers


def test_patch_routing_is_per_thread_and_survives_exceptions():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["here"] = patching.routing_active()
            t = threading.Thread(target=lambda: seen.__setitem__("other thread", patching.routing_active()))
            t.start()
            t.join()
            if x is None:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(Probe())
    patch(model)
    model(torch.ones(1))
    assert seen == {"here": True, "other thread": False}
    with pytest.raises(RuntimeError, match="boom"):
        model(None)
    assert not patching.routing_active(), "routing leaked out of a forward that raised"
    unpatch(model)


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing and autocast
# ----------------------------------------------------------------------------------------------------


def test_activation_checkpointing_matches_reference(attn_launches):
    cfg = TinyLMConfig()
    plain, ours, ref = _three_models(cfg, torch.float32, checkpoint=True)
    patch(ours)
    (batch,) = make_batches(cfg, 1, 2, 23, device=DEVICE)
    _check_model(plain, ours, ref, batch)
    # The recomputation in backward re-enters each block, so it routes to the kernels again.
    assert len(attn_launches) == 2 * cfg.n_layers


@pytest.mark.parametrize(
    "dtype",
    [torch.float16] + ([torch.bfloat16] if ON_GPU else []),
    ids=lambda d: str(d).split(".")[-1],
)
def test_autocast_matches_reference(dtype, attn_launches):
    cfg = TinyLMConfig()
    plain, ours, ref = _three_models(cfg, torch.float32)
    patch(ours)
    (batch,) = make_batches(cfg, 1, 2, 19, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        logits = ours(batch[0])
    assert logits.dtype == dtype
    _check_model(plain, ours, ref, batch, autocast_dtype=dtype)
    assert len(attn_launches) == 2 * cfg.n_layers
