"""Hugging Face transformers with attn_implementation="gradkernels", on a tiny random Llama (no download).

Three copies of one randomly initialised model: "gradkernels" in fp32 (ours), "eager" in fp32 (torch's
error scale) and "sdpa" in fp64 (the reference); logits and gradients by the two-oracle rule.
"""

import copy
import inspect

import pytest
import torch

from gradkernels import patching
from gradkernels.ops import attention as attention_ops

from utils import DEVICE, assert_close

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra (gradkernels[transformers])"
)
import gradkernels.integrations.transformers as gk_hf  # noqa: E402  (registers "gradkernels")

N_LAYERS = 2


@pytest.fixture
def attn_launches(monkeypatch):
    calls = []
    fwd = attention_ops.attention_forward

    def counting(q, k, v, causal_offset, scale, **kwargs):
        calls.append((q.shape[2], k.shape[2], causal_offset))
        return fwd(q, k, v, causal_offset, scale, **kwargs)

    monkeypatch.setattr(attention_ops, "attention_forward", counting)
    return calls


def _models():
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=80, intermediate_size=96, num_hidden_layers=N_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,  # head dim 40, MQA
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    ours = copy.deepcopy(base)
    ours.set_attn_implementation(gk_hf.NAME)
    plain = copy.deepcopy(base)
    plain.set_attn_implementation("eager")
    # The fp64 reference through torch's SDPA: transformers' eager path gives NaN rows for left padding
    # in fp64 (its additive mask overflows to -inf there), SDPA's math backend does not.
    ref = copy.deepcopy(base).double()
    ref.set_attn_implementation("sdpa")
    assert ours.config._attn_implementation == "gradkernels"
    return ours, plain, ref


def _run(model, ids, mask=None, labels=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare(results, valid=None):
    (lo, go), (lt, gt), (lr, gr) = results
    if valid is not None:  # padded query rows are not defined the same way by eager and SDPA masks
        lo, lt, lr = lo[valid], lt[valid], lr[valid]
    assert_close(lo, lt, lr, 2, "logits")
    assert set(go) == set(gr)
    for name in gr:
        assert_close(go[name], gt[name], gr[name], 3, f"grad {name}")


def test_llama_causal_no_padding_runs_on_kernels(attn_launches):
    models = _models()
    ids = torch.randint(0, 97, (2, 37), device=DEVICE)
    results = [_run(m, ids, labels=ids) for m in models]
    # One launch per layer, for the "gradkernels" model only; full causal (Lq == Lk: offset 0).
    assert attn_launches == [(37, 37, 0)] * N_LAYERS
    _compare(results)


def test_llama_padding_mask_hands_over_to_torch(attn_launches):
    models = _models()
    ids = torch.randint(0, 97, (2, 19), device=DEVICE)
    mask = torch.ones(2, 19, dtype=torch.long, device=DEVICE)
    mask[1, :6] = 0  # left padding on the second sequence
    labels = ids.masked_fill(mask == 0, -100)
    results = [_run(m, ids, mask, labels) for m in models]
    assert attn_launches == []  # a padding mask goes to torch's SDPA, by design
    _compare(results, valid=mask.bool())


def test_llama_decode_step_with_kv_cache(attn_launches):
    """Prefill then one cached decode step: Lq = 1 against Lk = 24 keys, no mask."""
    ours, plain, ref = _models()
    ids = torch.randint(0, 97, (2, 24), device=DEVICE)
    # transformers 5 renamed the forward argument past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(type(ours).forward).parameters else "past_key_values"
    logits = []
    with torch.no_grad():
        for m in (ours, plain, ref):
            cache = m(input_ids=ids[:, :-1], use_cache=True).past_key_values
            logits.append(m(input_ids=ids[:, -1:], use_cache=True, **{cache_arg: cache}).logits)
    assert attn_launches == [(23, 23, 0)] * N_LAYERS + [(1, 24, None)] * N_LAYERS
    assert_close(logits[0], logits[1], logits[2], 2, "decode logits")


def test_unsupported_features_are_refused():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="softcap"):
        gk_hf.gradkernels_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_patch_on_hf_model_replaces_linears():
    ours, _, _ = _models()
    summary = patching.patch(ours, attention=False)
    # 7 projections per layer (q, k, v, o, gate, up, down) and the LM head.
    assert len(summary.linear_replaced) == 7 * N_LAYERS + 1 and summary.linear_skipped == ()
    patching.unpatch(ours)
