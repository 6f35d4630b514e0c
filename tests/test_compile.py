"""torch.library custom ops: opcheck for every op, gradcheck through the one autograd route, and
torch.compile(fullgraph=True) of a patched model.

The compile test is the expensive one (Inductor's first compile on CPU takes tens of seconds): one model,
forward and backward, checked against the fp64 reference like every other test.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from gradkernels import autograd, custom_ops, patching, reference
from gradkernels.models import TinyLM, TinyLMConfig, make_batches

from utils import DEVICE, assert_close

ACTIVATIONS = list(reference.ACTIVATIONS)


# opcheck tests the schema, the fake implementation and AOT dispatch: the kernel math is the same for
# every activation (covered by the gradcheck below), so two suffice. The ops carry no autograd of their
# own (gradkernels.autograd's Functions call them with grad mode off), so inputs do not require grad.
@pytest.mark.parametrize("activation,with_bias,store_pre", [(None, True, False), ("gelu", False, True),
                                                            ("silu", True, False)])
def test_opcheck_linear_fwd(activation, with_bias, store_pre):
    x = torch.randn(37, 40, device=DEVICE)
    w = torch.randn(23, 40, device=DEVICE)
    b = torch.randn(23, device=DEVICE) if with_bias else None
    torch.library.opcheck(custom_ops.linear_fwd, (x, w, b, activation, store_pre))


@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
def test_opcheck_linear_bwd(needs):
    need_dx, need_dw, need_db = needs
    g = torch.randn(37, 23, device=DEVICE, dtype=torch.float64)
    x = torch.randn(37, 40, device=DEVICE, dtype=torch.float64)
    w = torch.randn(23, 40, device=DEVICE, dtype=torch.float64)
    pre = torch.randn(37, 23, device=DEVICE, dtype=torch.float64)
    torch.library.opcheck(
        custom_ops.linear_bwd,
        (g, x if need_dw else None, w if need_dx else None, pre, "gelu", need_dx, need_dw, need_db),
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_custom_op_linear_gradcheck(activation):
    """fp64 gradcheck through the autograd Function over the custom ops (eager and compiled route)."""
    x = torch.randn(2, 5, 9, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: autograd.linear(x, w, b, activation), (x, w, b), fast_mode=True
    )
    # Frozen weight and input, trainable bias: the bias-only backward branch.
    assert torch.autograd.gradcheck(
        lambda b: autograd.linear(x.detach(), w.detach(), b, activation), (b,), fast_mode=True
    )


# Causal offsets: None (no mask), Lk - Lq (the library's bottom-right), 0 (torch's top-left is_causal).
@pytest.mark.parametrize("causal", ["none", "bottom_right", "top_left"])
def test_opcheck_attention_fwd(causal):
    # GQA (4 query heads on 2 kv heads), Lq != Lk, Dv != D, and q read through a transposed view.
    q = torch.randn(1, 37, 4, 40, device=DEVICE).transpose(1, 2)
    k = torch.randn(1, 2, 23, 40, device=DEVICE)
    v = torch.randn(1, 2, 23, 24, device=DEVICE)
    offset = {"none": None, "bottom_right": 23 - 37, "top_left": 0}[causal]
    torch.library.opcheck(custom_ops.attention_fwd, (q, k, v, offset, 0.2))


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False)])
def test_opcheck_attention_bwd(needs):
    q = torch.randn(1, 4, 19, 16, device=DEVICE, dtype=torch.float64)
    k = torch.randn(1, 2, 23, 16, device=DEVICE, dtype=torch.float64)
    v = torch.randn(1, 2, 23, 8, device=DEVICE, dtype=torch.float64)
    out, lse, lse_lo = custom_ops.attention_fwd(q, k, v, 4, 0.25)
    g = torch.randn_like(out)
    torch.library.opcheck(custom_ops.attention_bwd, (g, q, k, v, out, lse, lse_lo, 4, 0.25, *needs))


@pytest.mark.parametrize("offset", [None, -3, 0])
def test_custom_op_attention_gradcheck(offset):
    """fp64 gradcheck through the attention Function over the custom ops; GQA, Lq != Lk."""
    q = torch.randn(1, 2, 5, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: autograd.attention(q, k, v, offset, 0.4)[0], (q, k, v), fast_mode=True
    )
    out, lse = autograd.attention(q, k, v, offset, 0.4)
    assert not lse.requires_grad


@pytest.fixture
def count_launches(monkeypatch):
    """Counts forward launches of the kernels, to prove the compiled graph runs them."""
    calls = {"linear": 0, "attention": 0}

    def counting(module, name, key):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(custom_ops.linear_ops, "linear_forward", "linear")
    counting(custom_ops.attention_ops, "attention_forward", "attention")
    return calls


def test_compile_fullgraph_patched_model(count_launches):
    torch._dynamo.reset()
    cfg = TinyLMConfig()
    torch.manual_seed(0)
    base = TinyLM(cfg).to(DEVICE)
    plain, ours, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).double()
    patching.patch(ours)
    compiled = torch.compile(ours, fullgraph=True)
    (batch,) = make_batches(cfg, 1, 2, 37, device=DEVICE)
    inputs, targets = batch

    results = []
    for run, params in ((plain, plain), (compiled, ours), (ref, ref)):
        logits = run(inputs)
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1)).backward()
        results.append((logits.detach(), {n: p.grad for n, p in params.named_parameters()}))
    (out_t, g_t), (out_o, g_o), (out_r, g_r) = results

    # 13 Linear layers and 2 attention layers, once each in the compiled forward.
    assert count_launches == {"linear": 13, "attention": 2}, count_launches
    assert_close(out_o, out_t, out_r, 2, "logits")
    for name in g_r:
        assert_close(g_o[name], g_t[name], g_r[name], 3, f"grad {name}")
