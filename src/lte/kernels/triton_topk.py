"""Launcher and entry point of top-k routing's mask on the GPU (``lte::router_topk_mask``).

Two launches: the router kernel writes the fp32 logits [B, E] (``_router_kernel`` with LOGITS: the
router weights read in parallel over blocks of experts, as for threshold routing), then
``_topk_kernel`` (one program per token) keeps each token's k experts of largest logit, ties to the
lower expert index. With a per-batch budget, one more: the top-k kernel writes every token's own
top k to a scratch mask, then ``_topk_budget_kernel`` (one program per token) sums the batch's union
and sigmoid scores, cuts the union to its ``budget`` experts of largest score and keeps its token's
top k among them, so every token keeps min(k, budget) experts, all among the batch's budget. k and
the budget are runtime arguments (no recompile) and nothing waits on the host, so the launches can
be captured in a CUDA graph. Dimensions: B tokens, D model width, E experts.
This module imports triton at import time: import it lazily.
"""

from __future__ import annotations

import torch

from .triton_ffn import (
    MAX_EXPERTS,
    MAX_TOKENS,
    _next_pow2,
    _pdl_kwargs,
    _pdl_supported,
    default_config,
    launch_router,
)
from .triton_masks import _topk_budget_kernel, _topk_kernel
from .tuning import TABLE_EXPERT_SIZE, KernelConfig

__all__ = ["launch_topk", "launch_topk_budget", "router_topk_mask_triton"]


def _topk_warps(e_pad: int) -> int:
    return 4 if e_pad <= 1024 else 8


def launch_topk(logits: torch.Tensor, mask_u8: torch.Tensor, k: int, pdl: bool) -> None:
    """Per-token top-k of fp32 logits [B, E] into mask_u8 [B, E] (1 = on); 1 <= k <= E."""
    num_tokens, num_exp = logits.shape
    e_pad = _next_pow2(num_exp)
    _topk_kernel[(num_tokens,)](
        logits, mask_u8, num_exp, k, logits.stride(0), mask_u8.stride(0), E_PAD=e_pad, PDL=pdl,
        num_warps=_topk_warps(e_pad), **_pdl_kwargs(pdl),
    )


def launch_topk_budget(logits: torch.Tensor, first_u8: torch.Tensor, mask_u8: torch.Tensor, k: int, budget: int,
                       pdl: bool) -> None:
    """Each token's top k among the batch's ``budget`` experts: from fp32 logits [B, E] and the tokens'
    own top-k masks first_u8 [B, E] (``launch_topk``) into mask_u8 [B, E]; 1 <= k <= E, 0 < budget < E."""
    num_tokens, num_exp = logits.shape
    e_pad = _next_pow2(num_exp)
    tile_tokens = min(_next_pow2(num_tokens), max(1, 8192 // e_pad))  # TB x E_PAD logits per load
    _topk_budget_kernel[(num_tokens,)](
        logits, first_u8, mask_u8, num_tokens, num_exp, k, budget, logits.stride(0), first_u8.stride(0),
        mask_u8.stride(0), E_PAD=e_pad, TB=tile_tokens, PDL=pdl, num_warps=_topk_warps(e_pad), **_pdl_kwargs(pdl),
    )


def router_topk_mask_triton(x: torch.Tensor, w_router: torch.Tensor, k: int,
                            config: KernelConfig | None = None, budget: int = 0) -> torch.Tensor:
    """Top-k routing mask for x [B, D] (1 <= B <= 64) and w_router [E, D]: bool [B, E] with the
    min(k, E) experts of largest logit ``x . Wr[e]`` (fp32 accumulation) on for every token; ties to
    the lower expert index. ``0 < budget < E``: the union's ``budget`` experts of largest summed
    sigmoid score (``reference.budget_keep``) are the batch's, and each token keeps its top k among
    them (``reference.router_topk_mask_reference``). Validated inputs only (see
    ``lte.kernels.router_topk_mask``)."""
    num_tokens, model_width = x.shape  # B, D
    num_exp = w_router.shape[0]  # E
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"the router top-k kernels take 1 to {MAX_TOKENS} tokens, got {num_tokens}")
    if not 1 <= num_exp <= MAX_EXPERTS:
        raise ValueError(f"the router top-k kernels take 1 to {MAX_EXPERTS} experts, got {num_exp}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0 (0 = no budget), got {budget}")
    cfg = config or default_config(num_tokens, model_width, num_exp * TABLE_EXPERT_SIZE, x.device)  # router rows: any S
    pdl = _pdl_supported(x.device)
    logits = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.float32)  # [B, E]
    out = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    launch_router(x, w_router, 0.0, None, None, None, cfg, pdl, logits=logits)
    mask_u8 = out.view(torch.uint8)
    k = min(int(k), num_exp)
    if 0 < budget < num_exp:
        first = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.uint8)  # [B, E] own top k
        launch_topk(logits, first, k, pdl)
        launch_topk_budget(logits, first, mask_u8, k, int(budget), pdl)  # each token's k among the budget's
    else:
        launch_topk(logits, mask_u8, k, pdl)
    return out
