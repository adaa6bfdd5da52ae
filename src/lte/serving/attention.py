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
"sdpa" to it. `FLEX_NAME` (`use_gqa_decode_attention(model, "flex")`) is the same decode step through
PyTorch's `flex_attention` over the unrepeated heads, whose split-KV decoding kernel Inductor generates
when the decode step is compiled (uncompiled, flex_attention runs a slow reference). `TRITON_NAME`
(`"triton"`) runs it through `lte.kernels.decode_attention`, our own split-KV kernel, compiled or not. Dimensions: B batch,
H query heads, Hkv key/value heads, G = H / Hkv, L cache length, d head width.
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


FLEX_NAME = "lte_flex_gqa_decode"
TRITON_NAME = "lte_triton_gqa_decode"
#: the decode attention kinds of `use_gqa_decode_attention`: their names in transformers' AttentionInterface
KINDS = {"sdpa": NAME, "flex": FLEX_NAME, "triton": TRITON_NAME}
#: the kind a decoder takes by default on a CUDA GPU of at least this compute capability (others: "sdpa"): the
#: Triton kernel, faster than the grouped SDPA path in every step timed on an H100 (2026-12-07, docs/benchmarks.md
#: "The Triton decode attention timed": dense Llama-3-8B and Qwen2.5-7B shapes 3-5% faster at B = 1, 8, 32,
#: compiled B = 1 too); older GPUs (no bf16 tensor cores) keep SDPA
TRITON_MIN_CAPABILITY = (8, 0)


def default_kind(device: torch.device | str) -> str:
    """The decode attention kind `StaticDecoder(gqa_decode=True)` takes on `device`: "triton" on a CUDA GPU of
    compute capability >= `TRITON_MIN_CAPABILITY`, else "sdpa"."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "sdpa"
    return "triton" if torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY else "sdpa"
#: cache lengths the flex path takes: multiples of flex_attention's KV block (compiled on a CPU, torch 2.13 gave
#: wrong outputs for one query token over 24 keys and right ones over 128 or 256); other lengths take the SDPA path
FLEX_BLOCK = 128
#: the smallest head dimension flex_attention's GPU kernels take (Inductor's CUDA lowering raises
#: NotImplementedError below it; the GPU test's first run, 2026-12-07, had 12 and failed); smaller heads take SDPA
FLEX_MIN_HEAD_DIM = 16


@torch.library.custom_op("lte::stored_mask", mutates_args=())
def stored_mask(mask: torch.Tensor) -> torch.Tensor:
    """A copy of `mask` that Inductor cannot fold into the kernel reading it. flex_attention's generated kernels
    take the tensors a score modification reads only as stored buffers: a mask still being computed inside the
    compiled graph (transformers builds it from the 2-D padding mask and the cache position) fails to compile,
    `XBLOCK is not defined` in Triton on CUDA (torch 2.11, 2026-12-07) and an assertion on the CPU (torch 2.13).
    As an opaque op it is computed into memory first: one [B, L] bool copy per layer and step (Inductor does not
    merge the layers' copies)."""
    return mask.clone()


@stored_mask.register_fake
def _(mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(mask)


def _keep(attention_mask: torch.Tensor, length: int) -> torch.Tensor | None:
    """[B, L] bool (True = attend) from SDPA's mask [B, 1, 1, >= L] (bool, or additive float); None when the
    mask has a head or query dimension this path does not take."""
    mask = attention_mask[..., :length]
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    mask = mask[:, 0, 0, :]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def flex_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """As `gqa_decode_attention`, through `flex_attention` with the grouped heads (`enable_gqa`) and the mask
    as a score modification; anything but one query token per sequence over a cache of a multiple of
    `FLEX_BLOCK` slots, with heads of at least `FLEX_MIN_HEAD_DIM`, goes to `gqa_decode_attention`."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h, t, d = query.shape
    hkv = key.shape[1]
    keep = _keep(attention_mask, key.shape[2]) if attention_mask is not None else None
    usable = (t == 1 and not dropout and h % hkv == 0 and key.shape[2] % FLEX_BLOCK == 0
              and min(d, value.shape[-1]) >= FLEX_MIN_HEAD_DIM
              and (attention_mask is None or keep is not None) and not any(kwargs.get(k) is not None for k in _UNSUPPORTED))
    if not usable:
        return gqa_decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, **kwargs)

    if keep is not None:
        keep = stored_mask(keep)

    def masked(score, batch, head, q_idx, kv_idx):  # noqa: ARG001 (flex_attention's signature)
        return torch.where(keep[batch, kv_idx], score, -float("inf"))

    out = flex_attention(query, key, value, score_mod=masked if keep is not None else None, scale=scaling,
                         enable_gqa=h != hkv)  # [B, H, 1, d]
    return out.transpose(1, 2).contiguous(), None


def triton_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """As `gqa_decode_attention`, through `lte.kernels.decode_attention` (on CUDA a split-KV Triton kernel that
    cuts the cache into slices, so one sequence's step fills the GPU; elsewhere the fp32 reference). Anything but
    one query token per sequence under a [B, 1, 1, L] mask goes to `gqa_decode_attention`."""
    from .. import kernels

    b, h, t, d = query.shape
    hkv = key.shape[1]
    keep = _keep(attention_mask, key.shape[2]) if attention_mask is not None else None
    usable = (t == 1 and not dropout and h % hkv == 0 and value.shape[-1] == d
              and (attention_mask is None or keep is not None) and not any(kwargs.get(k) is not None for k in _UNSUPPORTED))
    if not usable:
        return gqa_decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, **kwargs)
    out = kernels.decode_attention(query.reshape(b, hkv, h // hkv, d), key, value, keep, scaling)  # [B, Hkv, G, d]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `NAME`, `FLEX_NAME` and `TRITON_NAME` known to transformers (idempotent): the attention functions, and
    SDPA's mask for them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    for name, function in ((NAME, gqa_decode_attention), (FLEX_NAME, flex_decode_attention),
                           (TRITON_NAME, triton_decode_attention)):
        AttentionInterface.register(name, function)
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, sdpa_mask)


def head_dim(config: Any) -> int:
    """d, the width of one attention head of a (text) config: its `head_dim`, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _grouped(config: Any) -> bool:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return bool(heads and kv_heads and heads > kv_heads)


def use_gqa_decode_attention(model: nn.Module, kind: str = "sdpa", grouped_only: bool = True) -> bool:
    """Switch `model` from "sdpa" (or the other kind of `KINDS`) to the decode attention `kind` when it has fewer
    KV heads than query heads; True if it did (or runs it already). Other attention implementations are left
    alone, and so are models with one query head per KV head unless `grouped_only` is False (for "triton": its
    split-KV kernel can pay there too, where SDPA copies nothing)."""
    if kind not in KINDS:
        raise ValueError(f"unknown decode attention {kind!r}; choose one of {sorted(KINDS)}")
    name = KINDS[kind]
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == name:
        return True
    if current not in ("sdpa", *KINDS.values()):
        return False
    if grouped_only and not _grouped(getattr(config, "text_config", None) or config):
        return False
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        config._attn_implementation = name
    return True
