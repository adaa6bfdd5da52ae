"""Launcher and entry point of top-k routing's mask on the GPU (``lte::router_topk_mask``).

Two launches: the router kernel writes the fp32 logits [B, E] (``_router_kernel`` with LOGITS: the
router weights read in parallel over blocks of experts, as for threshold routing), then
``_topk_kernel`` (one program per token) keeps each token's k experts of largest logit, ties to the
lower expert index. With a per-batch budget, three: the router also writes each expert's sigmoid
score summed over the batch (its programs hold every token's logit for their experts) and clears a
union [E]; the top-k kernel also sets every token's own top k in that union; then
``_topk_budget_kernel`` (one program per token) leaves the rows as they are if the union fits the
budget, else cuts the union to its ``budget`` experts of largest score, from those E values, and
rewrites its token's row with its top k among them, so every token keeps min(k, budget) experts, all
among the batch's budget. k and the budget are runtime arguments (no recompile) and nothing waits on
the host, so the launches can be captured in a CUDA graph. Dimensions: B tokens, D model width, E
experts.
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


def launch_topk(logits: torch.Tensor, mask_u8: torch.Tensor, k: int, pdl: bool,
                union: torch.Tensor | None = None) -> None:
    """Per-token top-k of fp32 logits [B, E] into mask_u8 [B, E] (1 = on); 1 <= k <= E. With ``union``
    ([E] int8, cleared before: ``launch_router`` with logits and a score does it) every token's k
    experts are also set there."""
    num_tokens, num_exp = logits.shape
    e_pad = _next_pow2(num_exp)
    _topk_kernel[(num_tokens,)](
        logits, mask_u8, union if union is not None else mask_u8, num_exp, k, logits.stride(0), mask_u8.stride(0),
        E_PAD=e_pad, PDL=pdl, UNION=union is not None, num_warps=_topk_warps(e_pad), **_pdl_kwargs(pdl),
    )


def launch_topk_budget(logits: torch.Tensor, union: torch.Tensor, score: torch.Tensor, mask_u8: torch.Tensor,
                       k: int, budget: int, pdl: bool) -> None:
    """Each token's top k among the batch's ``budget`` experts, in place in mask_u8 [B, E] (which holds
    each token's own top k: ``launch_topk`` with ``union``), from fp32 logits [B, E], the union of the
    tokens' own top k (union [E] int8) and the summed sigmoid scores (score [E] fp32); rows stay as they
    are where the union fits the budget. 1 <= k <= E, 0 < budget < E."""
    num_tokens, num_exp = logits.shape
    e_pad = _next_pow2(num_exp)
    _topk_budget_kernel[(num_tokens,)](
        logits, union, score, mask_u8, num_exp, k, budget, logits.stride(0), mask_u8.stride(0),
        E_PAD=e_pad, PDL=pdl, num_warps=_topk_warps(e_pad), **_pdl_kwargs(pdl),
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
    mask_u8 = out.view(torch.uint8)
    k = min(int(k), num_exp)
    if 0 < budget < num_exp:
        union = torch.empty(num_exp, device=x.device, dtype=torch.int8)  # [E] the tokens' own top k, any token
        score = torch.empty(num_exp, device=x.device, dtype=torch.float32)  # [E] summed sigmoid scores
        launch_router(x, w_router, 0.0, None, union, score, cfg, pdl, logits=logits)  # clears the union too
        launch_topk(logits, mask_u8, k, pdl, union=union)  # own top k, and the union
        launch_topk_budget(logits, union, score, mask_u8, k, int(budget), pdl)  # each token's k among the budget's
    else:
        launch_router(x, w_router, 0.0, None, None, None, cfg, pdl, logits=logits)
        launch_topk(logits, mask_u8, k, pdl)
    return out
