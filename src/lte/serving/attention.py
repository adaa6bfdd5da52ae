"""Decode-step attention for grouped-query models that reads each KV head once.

transformers' SDPA attention repeats every key/value head for the query heads that share it
(`repeat_kv`) whenever a mask is passed, which a static cache always needs: at a decode step that
copies the whole cache, G times larger (G query heads per KV head; 4 on Llama-3-8B), and reads the copy
again, every layer. With one query token per sequence the G query heads of a KV head can instead be
its G query *rows*: q [B, H, 1, d] -> [B, Hkv, G, d] attends the unrepeated k, v [B, Hkv, L, d] under
the same mask, and the output goes back to [B, 1, H, d]. The result is the same attention; only the
copies go. Anything else (prefill, a bias or soft-capping, one query head per KV head) runs
transformers' own SDPA function unchanged.

It is registered, on first use, with transformers' `AttentionInterface` (and SDPA's mask function with
`AttentionMaskInterface`) under `NAME`; `use_gqa_decode_attention(model)` switches a model that runs
"sdpa" to it. Dimensions: B batch, H query heads, Hkv key/value heads, G = H / Hkv, L cache length,
d head width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lte_sdpa_gqa_decode"
#: keyword arguments the fast path does not implement: their presence sends a call to transformers' SDPA
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")


def gqa_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of q [B, H, T, d] over k, v [B, Hkv, L, d]; returns ([B, T, H, d], None) as transformers'
    attention functions do. T = 1 with H > Hkv takes the packed path; the rest goes to transformers' SDPA."""
    b, h, t, d = query.shape
    hkv = key.shape[1]
    packed = t == 1 and h > hkv and h % hkv == 0 and not any(kwargs.get(k) is not None for k in _UNSUPPORTED)
    if not packed:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    g = h // hkv
    q = query.reshape(b, hkv, g, d)  # query head i reads KV head i // G, as repeat_kv pairs them
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : key.shape[2]]  # [B, 1 or H, 1, L]
        if mask.shape[1] != 1:
            mask = mask.reshape(mask.shape[0], hkv, g, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)  # [B, Hkv, G, d]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `NAME` known to transformers (idempotent): the attention function, and SDPA's mask for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_decode_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, sdpa_mask)


def _grouped(config: Any) -> bool:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return bool(heads and kv_heads and heads > kv_heads)


def use_gqa_decode_attention(model: nn.Module) -> bool:
    """Switch `model` from "sdpa" to `NAME` when it has fewer KV heads than query heads; True if it did (or
    runs it already). Other attention implementations, and models without grouped heads, are left alone."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not _grouped(getattr(config, "text_config", None) or config):
        return False
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        config._attn_implementation = NAME
    return True
