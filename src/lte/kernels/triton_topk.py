"""Launcher and entry point of top-k routing's mask on the GPU (``lte::router_topk_mask``).

Two launches: the router kernel writes the fp32 logits [B, E] (``_router_kernel`` with LOGITS: the
router weights read in parallel over blocks of experts, as for threshold routing), then
``_topk_kernel`` (one program per token) keeps each token's k experts of largest logit, ties to the
lower expert index. With a per-batch budget three more: ``_union_kernel`` (the union of the tokens'
masks and each expert's summed sigmoid score), ``_budget_kernel`` (the union cut to its ``budget``
experts of largest score) and ``_topk_kernel`` again over those experts only, so every token keeps
min(k, budget) experts, all among the batch's budget. k and the budget
are runtime arguments (no recompile) and nothing waits on the host, so the launches can be captured
in a CUDA graph. Dimensions: B tokens, D model width, E experts.
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
    launch_budget_cut,
    launch_mask_union,
    launch_router,
)
from .triton_masks import _topk_kernel
from .tuning import TABLE_EXPERT_SIZE, KernelConfig

__all__ = ["launch_topk", "router_topk_mask_triton"]


def launch_topk(logits: torch.Tensor, mask_u8: torch.Tensor, k: int, pdl: bool,
                allowed: torch.Tensor | None = None) -> None:
    """Per-token top-k of fp32 logits [B, E] into mask_u8 [B, E] (1 = on); 1 <= k <= E. ``allowed``
    ([E] int8): only those experts compete (a token then keeps min(k, allowed) of them)."""
    num_tokens, num_exp = logits.shape
    e_pad = _next_pow2(num_exp)
    _topk_kernel[(num_tokens,)](
        logits, mask_u8, allowed if allowed is not None else mask_u8, num_exp, k, logits.stride(0),
        mask_u8.stride(0), E_PAD=e_pad, PDL=pdl, ALLOWED=allowed is not None,
        num_warps=4 if e_pad <= 1024 else 8, **_pdl_kwargs(pdl),
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
    launch_topk(logits, mask_u8, min(int(k), num_exp), pdl)
    if 0 < budget < num_exp:
        union = torch.empty(num_exp, device=x.device, dtype=torch.int8)  # [E] the tokens' union
        score = torch.empty(num_exp, device=x.device, dtype=torch.float32)  # [E] summed sigmoid scores
        kept = torch.empty_like(union)  # [E] the budget's experts
        launch_mask_union(mask_u8, union, trigger=pdl, logits=logits, score=score, wait=pdl)
        launch_budget_cut(union, score, kept, mask_u8, int(budget), pdl)
        launch_topk(logits, mask_u8, min(int(k), num_exp), pdl, allowed=kept)  # each token's k among them
    return out
