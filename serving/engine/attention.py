"""SDPA attention for decode steps of grouped-query models, without copying K/V per step.

HF's `sdpa` attention repeats K and V across query groups (`repeat_kv`, a full copy of the cache
each layer each step) whenever an attention mask is given, and the running batch always has one
(left padding). torch's SDPA takes `enable_gqa=True` with a mask, so the copy is not needed: at 32
concurrent requests on SmolLM2 (3 KV heads, 9 query heads) this measured 223 → 255 tok/s on 2 CPU
cores. Everything else (prefill, no-mask calls, non-GQA models) goes to HF's own function.
"""
from __future__ import annotations

import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "feedloop_sdpa"


def gqa_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
    """query (B, Hq, q, D); key, value (B, Hkv, T, D); attention_mask (B, 1, q, T) or None."""
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=True)  # (B, Hq, 1, D)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_decode_attention(model) -> bool:
    """Switch a model that uses HF's `sdpa` to this function (same masks); True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, gqa_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
