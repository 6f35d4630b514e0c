"""Hugging Face transformers with attn_implementation="gradkernels", on tiny random configs (no download):
Llama (padding, GQA, padding-free packing, KV cache), Mistral (sliding window), Gemma 2 (softcap and
alternating sliding windows), BERT (an encoder with a key-padding mask, also through ``patch``).

Three copies of one randomly initialised model: "gradkernels" in fp32 (ours), "eager" in fp32 (torch's
error scale) and "sdpa" in fp64 (the reference); logits and gradients by the two-oracle rule. Every test
also counts that each attention call of the "gradkernels" model ran through gradkernels' attention ops
and none was handed to torch's SDPA.
"""

import collections
import contextlib
import copy
import inspect

import pytest
import torch

from gradkernels import custom_ops, patching
from utils import DEVICE, assert_close

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra (gradkernels[transformers])"
)
import gradkernels.integrations.transformers as gk_hf  # noqa: E402  (registers "gradkernels")

N_LAYERS = 2
OPS = ("attention_fwd", "attention_features_fwd", "attention_varlen_fwd")


@pytest.fixture
def launches(monkeypatch):
    """(op, q shape) of every gradkernels attention forward op call; torch's SDPA calls counted apart."""
    calls = []
    for name in OPS:
        op = getattr(custom_ops, name)

        def counting(*args, _op=op, _name=name):
            calls.append((_name, tuple(args[0].shape)))
            return _op(*args)

        monkeypatch.setattr(custom_ops, name, counting)
    return calls


@contextlib.contextmanager
def no_torch_sdpa(monkeypatch):
    """Fail if torch's SDPA runs inside (a hand-over)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    handed = []
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention",
                  lambda *a, **k: handed.append(1) or sdpa(*a, **k))
        yield
    assert not handed, f"{len(handed)} attention calls were handed to torch's SDPA"


def _copies(base, ref_implementation="sdpa"):
    ours = copy.deepcopy(base)
    ours.set_attn_implementation(gk_hf.NAME)
    plain = copy.deepcopy(base)
    plain.set_attn_implementation("eager")
    # The fp64 reference through torch's SDPA: transformers' eager path gives NaN rows for left padding
    # in fp64 (its additive mask overflows to -inf there), SDPA's math backend does not.
    ref = copy.deepcopy(base).double()
    ref.set_attn_implementation(ref_implementation)
    assert ours.config._attn_implementation == "gradkernels"
    return ours, plain, ref


def _llama(heads=4, kv_heads=2):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=80, intermediate_size=96, num_hidden_layers=N_LAYERS,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return _copies(transformers.LlamaForCausalLM(cfg).to(DEVICE))


def _run(model, labels=None, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _run_all(models, monkeypatch, launches, expected_calls, **inputs):
    """Run the three copies; ours must make ``expected_calls`` gradkernels op calls and none to torch."""
    ours, plain, ref = models
    with no_torch_sdpa(monkeypatch):
        first = _run(ours, **inputs)
    assert len(launches) == expected_calls, launches
    made = list(launches)
    return [first, _run(plain, **inputs), _run(ref, **inputs)], made


def _compare(results, valid=None):
    (lo, go), (lt, gt), (lr, gr) = results
    if valid is not None:  # padded query rows are not defined the same way by eager and the varlen path
        lo, lt, lr = lo[valid], lt[valid], lr[valid]
    assert_close(lo, lt, lr, 2, "logits")
    assert set(go) == set(gr)
    for name in gr:
        assert_close(go[name], gt[name], gr[name], 3, f"grad {name}")


def _left_padded(batch=2, length=19, pad=6):
    ids = torch.randint(0, 97, (batch, length), device=DEVICE)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[1, :pad] = 0
    return ids, mask


def test_llama_causal_no_padding_runs_on_kernels(monkeypatch, launches):
    models = _llama()
    ids = torch.randint(0, 97, (2, 37), device=DEVICE)
    results, made = _run_all(models, monkeypatch, launches, N_LAYERS, input_ids=ids, labels=ids)
    assert made == [("attention_fwd", (2, 4, 37, 20))] * N_LAYERS  # the plain op: one launch per layer
    _compare(results)


@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_padded_batch_runs_as_varlen(monkeypatch, launches, side):
    models = _llama()
    ids = torch.randint(0, 97, (3, 19), device=DEVICE)
    mask = torch.ones(3, 19, dtype=torch.long, device=DEVICE)
    if side == "left":
        mask[1, :6], mask[2, :1] = 0, 0
    else:
        mask[1, 13:], mask[2, 18:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    results, made = _run_all(models, monkeypatch, launches, N_LAYERS, input_ids=ids, attention_mask=mask,
                             labels=labels)
    total = int(mask.sum())
    assert made == [("attention_varlen_fwd", (total, 4, 20))] * N_LAYERS  # packed: no padding computed
    _compare(results, valid=mask.bool())


def test_llama_padding_free_packed_batch(monkeypatch, launches):
    """DataCollatorWithFlattening's layout: one row of three sequences, position_ids restarting at 0; and
    the same with its flash-attention kwargs (cu_seq_lens_*, max_length_*). ``use_cache=False``: with a
    cache, transformers' eager and SDPA masks do not separate packed sequences (only the FlashAttention
    path does), so the references would attend across them."""
    models = _llama()
    lengths = [11, 5, 17]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    features = [{"input_ids": torch.randint(0, 97, (n,)).tolist()} for n in lengths]
    batch = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in collator(features).items()}
    assert batch["position_ids"].tolist()[0][:12] == list(range(11)) + [0]
    labels = batch.pop("labels")
    batch["use_cache"] = False
    with_kwargs, made = _run_all(models, monkeypatch, launches, N_LAYERS, labels=labels, **batch)
    assert made == [("attention_varlen_fwd", (33, 4, 20))] * N_LAYERS
    _compare(with_kwargs)
    launches.clear()
    plain_batch = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    from_positions, made = _run_all(models, monkeypatch, launches, N_LAYERS, labels=labels, **plain_batch)
    assert made == [("attention_varlen_fwd", (33, 4, 20))] * N_LAYERS
    _compare(from_positions)


def test_llama_decode_step_with_kv_cache(monkeypatch, launches):
    """Prefill then one cached decode step, without padding (dense, bottom-right) and with left padding
    (varlen: one query per sequence against its real keys)."""
    ours, plain, ref = _llama()
    ids, mask = _left_padded(2, 24, 5)
    # transformers 5 renamed the forward argument past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(type(ours).forward).parameters else "past_key_values"
    for attention_mask in (None, mask):
        launches.clear()
        logits = []
        for m in (ours, plain, ref):
            with torch.no_grad(), (no_torch_sdpa(monkeypatch) if m is ours else contextlib.nullcontext()):
                kw = {} if attention_mask is None else {"attention_mask": attention_mask[:, :-1]}
                cache = m(input_ids=ids[:, :-1], use_cache=True, **kw).past_key_values
                kw = {} if attention_mask is None else {"attention_mask": attention_mask}
                logits.append(m(input_ids=ids[:, -1:], use_cache=True, **{cache_arg: cache}, **kw).logits)
        if attention_mask is None:
            assert launches == [("attention_fwd", (2, 4, 23, 20))] * N_LAYERS + [("attention_fwd", (2, 4, 1, 20))] * N_LAYERS
        else:
            assert [name for name, _ in launches] == ["attention_varlen_fwd"] * (2 * N_LAYERS)
            assert launches[-1][1] == (2, 4, 20)  # one query per sequence
        assert_close(logits[0], logits[1], logits[2], 2, "decode logits")


def test_mistral_sliding_window_with_padding(monkeypatch, launches):
    cfg = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=6,
    )
    torch.manual_seed(0)
    models = _copies(transformers.MistralForCausalLM(cfg).to(DEVICE))
    ids, mask = _left_padded(2, 23, 4)
    labels = ids.masked_fill(mask == 0, -100)
    results, made = _run_all(models, monkeypatch, launches, N_LAYERS, input_ids=ids, attention_mask=mask,
                             labels=labels)
    assert [name for name, _ in made] == ["attention_varlen_fwd"] * N_LAYERS
    _compare(results, valid=mask.bool())
    launches.clear()  # without padding: one dense windowed call per layer
    results, made = _run_all(models, monkeypatch, launches, N_LAYERS, input_ids=ids, labels=ids)
    assert [name for name, _ in made] == ["attention_features_fwd"] * N_LAYERS
    _compare(results)


def test_gemma2_softcap_and_alternating_sliding_window(monkeypatch, launches):
    cfg = transformers.Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=5,
        attn_logit_softcapping=1.5, final_logit_softcapping=None, query_pre_attn_scalar=16, initializer_range=0.2,
    )
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    # Gemma 2 has no SDPA path (softcap): the fp64 reference is eager (no padding here, so no -inf rows).
    models = _copies(transformers.Gemma2ForCausalLM(cfg).to(DEVICE), ref_implementation="eager")
    seen = []
    forward = gk_hf.functional.attention

    def spy(*args, **kwargs):  # the softcap and windows the layers asked for
        seen.append((kwargs.get("softcap"), kwargs.get("window_size")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(gk_hf.functional, "attention", spy)
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    results, made = _run_all(models, monkeypatch, launches, N_LAYERS, input_ids=ids, labels=ids)
    assert [name for name, _ in made] == ["attention_features_fwd"] * N_LAYERS
    assert seen == [(1.5, (4, 4)), (1.5, None)]  # sliding layer (w - 1; causal makes right 0), full layer
    _compare(results)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).to(DEVICE).eval()


def _bert_run(model, ids, mask):
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    (hidden[valid] ** 2).sum().backward()
    return hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _bert_batch():
    ids = torch.randint(0, 97, (3, 17), device=DEVICE)
    mask = torch.ones(3, 17, dtype=torch.long, device=DEVICE)
    mask[0, 11:], mask[2, 5:] = 0, 0  # right padding, as BERT tokenizers pad
    return ids, mask


def test_bert_padded_batch_runs_as_varlen(monkeypatch, launches):
    base = _bert()
    ours, plain, ref = _copies(base)
    ids, mask = _bert_batch()
    with no_torch_sdpa(monkeypatch):
        first = _bert_run(ours, ids, mask)
    assert [name for name, _ in launches] == ["attention_varlen_fwd"] * N_LAYERS
    _compare([first, _bert_run(plain, ids, mask), _bert_run(ref, ids, mask)], valid=mask.bool())
    # Train mode: the attention dropout (0.1) runs on gradkernels too, inside the same varlen calls.
    launches.clear()
    ours.train()
    with no_torch_sdpa(monkeypatch):
        ours(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert [name for name, _ in launches] == ["attention_varlen_fwd"] * N_LAYERS


def test_bert_sdpa_model_patched_runs_key_padding_masks_on_kernels(monkeypatch, launches):
    """``patch`` of an "sdpa" BERT: its 4-D boolean key-padding masks run as varlen (no hand-over)."""
    base = _bert()
    ours = copy.deepcopy(base)
    ours.set_attn_implementation("sdpa")
    plain = copy.deepcopy(base)
    plain.set_attn_implementation("eager")
    ref = copy.deepcopy(base).double()
    ref.set_attn_implementation("sdpa")
    ids, mask = _bert_batch()
    summary = patching.patch(ours, linear=False)
    try:
        before = patching.attention_paths()
        first = _bert_run(ours, ids, mask)
        taken = patching.attention_paths() - before
    finally:
        patching.unpatch(ours)
    assert summary.attention_routed and "attention_paths()" in str(summary)
    assert [name for name, _ in launches] == ["attention_varlen_fwd"] * N_LAYERS
    assert taken == {"key padding -> varlen": N_LAYERS}  # and no "torch: ..." hand-over
    # Padded query rows: torch's SDPA semantics (a key-padding mask leaves them attending to the real
    # keys), so every row is compared here, not only the real tokens.
    _compare([first, _bert_run(plain, ids, mask), _bert_run(ref, ids, mask)])


def test_unsupported_features_are_refused():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="s_aux"):
        gk_hf.gradkernels_attention_forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2))


def test_path_counts_say_which_path_calls_took():
    before = collections.Counter(gk_hf.path_counts)
    models = _llama()
    ids, mask = _left_padded()
    with torch.no_grad():
        models[0](input_ids=ids, attention_mask=mask)
        models[0](input_ids=ids)
    delta = gk_hf.path_counts - before
    assert delta == {"varlen": N_LAYERS, "dense": N_LAYERS}


def test_patch_on_hf_model_replaces_linears():
    ours, _, _ = _llama()
    summary = patching.patch(ours, attention=False)
    # 7 projections per layer (q, k, v, o, gate, up, down) and the LM head.
    assert len(summary.linear_replaced) == 7 * N_LAYERS + 1 and summary.linear_skipped == ()
    patching.unpatch(ours)
