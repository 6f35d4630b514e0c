"""torch.compile around the integration points: no graph break when the SDPA drop-in hands a call to
torch, no Dynamo warning from gradkernels' own code, and unpatch through torch.compile / DDP wrappers.

Graph breaks are Dynamo's business, so these compile with ``backend="aot_eager"`` (Dynamo and
AOTAutograd, no Inductor code generation: seconds instead of minutes on a CPU).
"""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels import _device, patching
from gradkernels.ops import attention as attention_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def attn_launches(monkeypatch):
    calls = []
    forward = attention_ops.attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "attention_forward", counting)
    return calls


def _qkv():
    torch.manual_seed(9)
    return (torch.randn(1, 2, 13, 8, device=DEVICE), torch.randn(1, 2, 11, 8, device=DEVICE),
            torch.randn(1, 2, 11, 8, device=DEVICE))


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compiled_sdpa_with_a_mask_has_no_graph_break(attn_launches):
    q, k, v = _qkv()
    mask = torch.rand(13, 11, device=DEVICE) > 0.4
    mask[:, 0] = True
    compiled = _compile(lambda q, k, v: gradkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    out = compiled(q, k, v)  # fullgraph=True: a graph break would raise here
    assert attn_launches == []  # handed to torch, as in eager mode
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=0)


def test_compiled_sdpa_with_dropout_has_no_graph_break(attn_launches):
    q, k, v = _qkv()
    compiled = _compile(lambda q, k, v: gradkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    out = compiled(q, k, v)
    assert attn_launches == [] and out.shape == (1, 2, 13, 8)
    no_dropout = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out, no_dropout)  # dropout did happen


def test_compiled_sdpa_on_the_torch_backend_has_no_graph_break(attn_launches):
    q, k, v = _qkv()
    with _device.force_torch_backend():
        out = _compile(lambda q, k, v: gradkernels.scaled_dot_product_attention(q, k, v, is_causal=True))(q, k, v)
    assert attn_launches == []
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)


class _MaskedAttention(torch.nn.Module):
    """A model that calls torch's SDPA with a mask (padding), as transformers models do."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x, mask):
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 1, 8).transpose(1, 3).unbind(2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_compiled_patched_model_with_a_masked_sdpa_has_no_graph_break(attn_launches):
    torch.manual_seed(10)
    model = _MaskedAttention().to(DEVICE)
    x = torch.randn(2, 9, 8, device=DEVICE)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool, device=DEVICE).tril()
    expected = model(x, mask)
    patching.patch(model)
    try:
        out = _compile(model)(x, mask)
    finally:
        patching.unpatch(model)
    assert attn_launches == []
    torch.testing.assert_close(out, expected)


def test_hand_over_is_logged_in_eager_mode(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.DEBUG, logger="gradkernels"):
        mask = torch.ones(13, 11, dtype=torch.bool, device=DEVICE)
        mask[3, 4] = False  # not a key-padding mask: torch's
        gradkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert "attn_mask is not a key-padding mask" in caplog.text


def test_compiling_gradkernels_raises_no_dynamo_warning():
    """Dynamo warned about the lru_cache on _device.triton_available at every compile."""
    q, k, v = _qkv()
    w = torch.randn(8, 8, device=DEVICE)

    def fn(q, k, v):
        return gradkernels.linear(gradkernels.scaled_dot_product_attention(q, k, v), w, None, "gelu")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile(fn)(q, k, v)
    assert not [str(c.message) for c in caught if "gradkernels" in str(c.filename) or "lru_cache" in str(c.message)]


# ----------------------------------------------------------------------------------------------------
# unpatch through wrappers
# ----------------------------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_unpatch_of_a_compiled_model(attn_launches):
    torch.manual_seed(11)
    model = _Tiny().to(DEVICE)
    originals = (model.up, model.down)
    x = torch.randn(3, 8, device=DEVICE)
    expected = model(x)
    patching.patch(model)
    compiled = _compile(model)
    torch.testing.assert_close(compiled(x), expected)
    assert patching.is_patched(compiled)
    with pytest.raises(RuntimeError, match="already patched"):
        patching.patch(compiled)

    summary = gradkernels.unpatch(compiled)
    assert sorted(summary.linear_replaced) == ["down", "up"]
    assert (model.up, model.down) == originals and not patching.is_patched(model)
    torch.testing.assert_close(compiled(x), expected)  # recompiled on the restored modules
    with pytest.raises(RuntimeError, match="not patched"):
        gradkernels.unpatch(compiled)


def test_unpatch_of_data_parallel_wrappers(tmp_path):
    torch.manual_seed(12)
    model = _Tiny()
    patching.patch(model)
    assert sorted(gradkernels.unpatch(torch.nn.DataParallel(model)).linear_replaced) == ["down", "up"]
    assert type(model.up) is torch.nn.Linear

    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed (DDP)")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        patching.patch(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert patching.is_patched(ddp)
        assert sorted(gradkernels.unpatch(ddp).linear_replaced) == ["down", "up"]
        assert type(model.up) is torch.nn.Linear and type(ddp.module.down) is torch.nn.Linear
    finally:
        dist.destroy_process_group()
