"""Hugging Face transformers: gradkernels as an attention implementation, ``attn_implementation="gradkernels"``.

Usage::

    import gradkernels.integrations.transformers  # registers "gradkernels" (idempotent)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gradkernels")

or ``model.set_attn_implementation("gradkernels")`` on a loaded model. Importing this module calls
:func:`register`; it needs a transformers with ``AttentionInterface`` (4.48+) and, for masks to be
built the way SDPA needs them, ``masking_utils.AttentionMaskInterface`` (4.53+).

What runs where. transformers calls the registered function with query (B, Hq, Lq, D), key and value
(B, Hkv, Lk, D) and a mask built by the same mask function as its ``"sdpa"`` implementation (registered
for ``"gradkernels"`` too), which is None whenever the mask is plain causal without padding (the usual
training case). Such calls, and non-causal ones without a mask, run on the Triton kernels, with
grouped-query attention read in place (no ``repeat_kv``). Calls with a padding or custom mask, dropout,
or shapes the kernels do not cover go to torch's SDPA through
:func:`gradkernels.scaled_dot_product_attention`, which hands them over with torch's own semantics.
Models that pass ``softcap`` (logit soft-capping), ``s_aux`` (attention sinks) or ``position_bias``
(T5-style additive biases) get a ValueError naming the feature: use ``"eager"`` or ``"sdpa"`` for them.

The function returns ``(attn_output (B, Lq, Hq, Dv), None)``: attention weights are never materialised.
"""

from __future__ import annotations

from .. import functional

NAME = "gradkernels"

__all__ = ["NAME", "gradkernels_attention_forward", "register"]


def gradkernels_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """transformers ``AttentionInterface`` function: causal / GQA attention on the gradkernels kernels.

    Args:
        module: the attention module (read: ``is_causal``).
        query: (B, Hq, Lq, D). key, value: (B, Hkv, Lk, D), (B, Hkv, Lk, Dv); Hq a multiple of Hkv.
        attention_mask: None, or a boolean / additive mask broadcastable to (B, Hq, Lq, Lk), as built by
            transformers' ``sdpa_mask``.
        dropout: attention dropout probability (non-zero goes to torch's SDPA).
        scaling: softmax scale; ``1/sqrt(D)`` when None.
        is_causal: overrides ``module.is_causal`` when given.
        **kwargs: other model kwargs, ignored as by transformers' SDPA, except the unsupported
            ``softcap``, ``s_aux`` and ``position_bias``.

    Returns:
        ``(attn_output, None)`` with attn_output (B, Lq, Hq, Dv), contiguous.

    Raises:
        ValueError: ``softcap``, ``s_aux`` or ``position_bias`` is given.
    """
    for feature in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(feature) is not None:
            raise ValueError(
                f"attn_implementation='gradkernels' does not support {feature!r} (logit soft-capping, "
                "attention sinks and additive position biases are not in the kernels): use 'eager' or 'sdpa'"
            )
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: a single query token sees every key; with a mask, the mask says all.
    # Shapes are checked first so that torch.compile's dynamic shapes give a plain bool.
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and kv_length > q_length:
        # Prefill into an empty static cache: with top-left alignment the keys past Lq are invisible
        # anyway, so drop them rather than compute them away.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register :func:`gradkernels_attention_forward` with transformers under ``name``.

    Also registers transformers' SDPA mask function under the same name: without it, transformers
    builds no mask at all for an implementation it does not know (padding would be ignored).

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
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds masks per model, from the implementation's name
        return
    AttentionMaskInterface.register(name, sdpa_mask)


register()
