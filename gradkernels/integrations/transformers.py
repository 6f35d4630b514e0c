"""Hugging Face transformers: gradkernels as an attention implementation, ``attn_implementation="gradkernels"``.

Usage::

    import gradkernels.integrations.transformers  # registers "gradkernels" (idempotent)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gradkernels")

or ``model.set_attn_implementation("gradkernels")`` on a loaded model. Importing this module calls
:func:`register`; it needs a transformers with ``AttentionInterface`` (4.48+) and, for the masks below,
``masking_utils.AttentionMaskInterface`` (4.53+).

It works as transformers' FlashAttention-2 integration (``modeling_flash_attention_utils``) does, on
gradkernels' kernels:

- Masks are built by transformers' ``flash_attention_mask`` (registered for "gradkernels" too): None when
  there is no padding, else the 2-D (B, Lk) padding mask.
- **Padded batches** (a 2-D mask) are unpadded into a packed batch and run by
  :func:`gradkernels.attention_varlen` (queries with the mask's last Lq columns: left padding when Lq < Lk,
  one query per sequence when decoding), then padded back; padded query rows are 0.
- **Padding-free batches**: with ``cu_seq_lens_q/k`` and ``max_length_q/k`` in the kwargs
  (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), or ``position_ids`` that restart
  (batch of 1, ``DataCollatorWithFlattening``), the sequences run as varlen without a mask.
- Otherwise one dense :func:`gradkernels.attention` call, causal bottom-right (what a KV cache needs).
- ``sliding_window`` (Mistral, Qwen2, Gemma 2's sliding layers) becomes ``window_size = (w - 1, w - 1)``
  (``(w - 1, 0)`` causal), when the keys are longer than the window, as for FlashAttention;
  ``softcap`` (Gemma 2's ``attn_logit_softcapping``) and ``dropout`` (the module's attention dropout in
  train mode) are passed on. Grouped-query attention is read in place (no ``repeat_kv``).
- A 4-D mask (a custom mask given by the caller) goes to :func:`gradkernels.scaled_dot_product_attention`,
  which runs key-padding masks on the kernels and hands anything else to torch's SDPA.

Not supported (ValueError naming the feature): ``s_aux`` (attention sinks) and ``position_bias``
(T5-style additive biases); ``softcap`` together with a 4-D mask that is not a padding mask.

The function returns ``(attn_output (B, Lq, Hq, Dv), None)``: attention weights are never materialised.
:data:`path_counts` counts the calls per path (``"dense"``, ``"varlen"``, ``"sdpa"``) in eager mode.
"""

from __future__ import annotations

import collections

import torch

from .. import functional

NAME = "gradkernels"

__all__ = ["NAME", "gradkernels_attention_forward", "register", "path_counts", "unpad", "pad"]

# How the calls ran (eager mode only: counting is not traced under torch.compile).
path_counts: collections.Counter = collections.Counter()


def _count(path):
    if not torch.compiler.is_compiling():
        path_counts[path] += 1


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def unpad(x: torch.Tensor, mask: torch.Tensor):
    """``(packed, indices, cu_seqlens, max_seqlen)`` of a padded (B, L, ...) tensor and its (B, L) mask
    (nonzero: a real token): the real tokens back to back, their flat indices, the int32 prefix sums of
    the lengths and the longest length (read on the host)."""
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    packed = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[indices]
    return packed, indices, _cu_seqlens(lengths), int(lengths.max()) if lengths.numel() else 0


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The inverse of :func:`unpad`: (B, L, ...) with zeros at the padding (differentiable)."""
    out = packed.new_zeros((batch * length, *packed.shape[1:]))
    out = out.index_put((indices,), packed)
    return out.view(batch, length, *packed.shape[1:])


def _packed_positions(position_ids, batch):
    """cu_seqlens and the longest length when ``position_ids`` (batch 1) restart, i.e. sequences were
    packed into one row (``DataCollatorWithFlattening``); None otherwise (one sync, as transformers)."""
    if position_ids is None or batch != 1 or position_ids.shape[-1] == 1:
        return None
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == pos.min(), as_tuple=False).flatten()
    if starts.numel() <= 1:
        return None
    cu = torch.cat([starts.to(torch.int32), torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


def gradkernels_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers ``AttentionInterface`` function: attention on the gradkernels kernels (see the module
    docstring for the paths).

    Args:
        module: the attention module (read: ``is_causal``).
        query: (B, Hq, Lq, D). key, value: (B, Hkv, Lk, D), (B, Hkv, Lk, Dv); Hq a multiple of Hkv.
        attention_mask: None, a (B, Lk) padding mask (nonzero: a real token), or a 4-D mask.
        dropout: attention dropout probability (the module passes 0 in eval mode).
        scaling: softmax scale; ``1/sqrt(D)`` when None.
        sliding_window: the window length w (each query sees w keys when causal), or None.
        softcap: attention-logit soft-capping, or None.
        is_causal: overrides ``module.is_causal`` when given.
        **kwargs: ``position_ids``, ``cu_seq_lens_q/k``, ``max_length_q/k`` (padding-free batches); other
            model kwargs are ignored, as by transformers' SDPA, except the unsupported ``s_aux`` and
            ``position_bias``.

    Returns:
        ``(attn_output, None)`` with attn_output (B, Lq, Hq, Dv).

    Raises:
        ValueError: ``s_aux`` or ``position_bias`` is given; ``softcap`` with a 4-D mask.
    """
    for feature in ("s_aux", "position_bias"):
        if kwargs.get(feature) is not None:
            raise ValueError(
                f"attn_implementation='gradkernels' does not support {feature!r} (attention sinks and additive "
                "position biases are not in the kernels): use 'eager' or 'sdpa'"
            )
    batch, q_length, kv_length = query.shape[0], query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    features = dict(causal=bool(is_causal), scale=scaling, softcap=0.0 if softcap is None else float(softcap),
                    dropout_p=float(dropout))
    if sliding_window is not None and kv_length > sliding_window:
        features["window_size"] = (sliding_window - 1, sliding_window - 1)
    # (B, H, L, D) views of transformers' (B, L, H, D) projections: back to that layout, no copy.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))

    if attention_mask is not None and attention_mask.dim() == 2:
        _count("varlen")
        mask = attention_mask.bool()
        if k.shape[1] > mask.shape[1]:  # a static cache longer than the tokens seen: only those
            k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
        k_packed, indices_k, cu_k, max_k = unpad(k, mask)
        v_packed = v.reshape(-1, *v.shape[2:])[indices_k]
        if q_length == mask.shape[1]:
            q_packed, indices_q, cu_q, max_q = q.reshape(-1, *q.shape[2:])[indices_k], indices_k, cu_k, max_k
        elif q_length == 1:
            q_packed, max_q = q.reshape(batch, *q.shape[2:]), 1
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
            indices_q = cu_q[:-1].long()
        else:  # queries are the last Lq tokens (left padding)
            q_packed, indices_q, cu_q, max_q = unpad(q, mask[:, -q_length:])
        out = functional.attention_varlen(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, **features)
        return pad(out, indices_q, batch, q_length), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    packed = None
    if attention_mask is None and all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        packed = (cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k))
    elif attention_mask is None:
        found = _packed_positions(kwargs.get("position_ids"), batch)
        if found is not None:
            packed = (found[0], found[0], found[1], found[1])
    if packed is not None:
        _count("varlen")
        flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
        out = functional.attention_varlen(*flat, *packed, **features)
        return out.view(batch, q_length, *out.shape[1:]), None

    if attention_mask is not None:  # a 4-D mask from the caller: torch's SDPA semantics
        if features["softcap"]:
            raise ValueError("attn_implementation='gradkernels' cannot apply softcap with a custom 4-D attention "
                             "mask: use 'eager'")
        _count("sdpa")
        out = functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=features["dropout_p"], scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None

    _count("dense")
    out = functional.attention(query, key, value, **features)
    return out.transpose(1, 2), None


def register(name: str = NAME) -> None:
    """Register :func:`gradkernels_attention_forward` with transformers under ``name``.

    Also registers transformers' FlashAttention mask function (``flash_attention_mask``: None or the 2-D
    padding mask) under the same name; without a mask function transformers builds no mask at all for an
    implementation it does not know (padding would be ignored). On transformers < 4.53 (no
    ``masking_utils``) the models build 4-D masks, which go through the SDPA drop-in.

    Raises:
        ImportError: transformers is not installed, or too old to have ``AttentionInterface``.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError(
            "gradkernels.integrations.transformers needs transformers>=4.48 (pip install 'gradkernels[transformers]')"
        ) from e
    AttentionInterface.register(name, gradkernels_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:  # transformers < 4.53 builds masks per model, from the implementation's name
        return
    AttentionMaskInterface.register(name, flash_attention_mask)


register()
