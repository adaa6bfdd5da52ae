"""The two halves of the decode FFN for a model that applies the activation itself between them (OPT's decoder
layer, whose ReLU the HF module runs): router (+ budget) and the up projection over the union's experts, then the
down projection over the same experts. Launch plumbing lives in `triton_ffn`."""

from __future__ import annotations

import torch

from .triton_ffn import launch_compact, launch_finish, launch_in, launch_out, launch_route, plan_launch
from .tuning import KernelConfig

__all__ = ["routed_ffn_in_triton", "sparse_ffn_out_triton"]


def routed_ffn_in_triton(
    x: torch.Tensor,
    w_router: torch.Tensor,
    threshold: float,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    expert_size: int,
    budget: int = 0,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of a plain FFN whose model applies the activation itself (OPT's decoder layer):
    router (+ budget), then ``z = x W1^T + b1`` for the union's experts (0 for a token's off experts).

    x [B, D] (B <= 64), w_router [E, D], w_up [F, D]. Returns (z [B, F] in x's dtype; rows of experts
    outside the union are not written), mask [B, E] bool, union [E] int8). Validated inputs only."""
    num_tokens = x.shape[0]
    num_exp = w_router.shape[0]
    mask = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    p = plan_launch(x, mask, w_up, w_up, None, b_up, None, expert_size, "identity", config,
                    h_dtype=x.dtype, need_out=False)
    launch_route(p, x, w_router, threshold, budget)
    launch_in(p)
    return p.h, mask, p.union


def sparse_ffn_out_triton(
    h: torch.Tensor,
    mask: torch.Tensor,
    union: torch.Tensor,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    expert_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The second half: ``y = (h * m) Wd_t + b2`` over the union's experts, for h [B, F] (any rows
    outside the union are never read), mask [B, E] bool, union [E] int8, w_down_t [F, D]; y [B, D]."""
    num_tokens = h.shape[0]
    model_width = w_down_t.shape[1]
    shape_x = h.new_empty(num_tokens, model_width, dtype=w_down_t.dtype)  # gives the plan B, D and dtype
    p = plan_launch(shape_x, mask, w_down_t, w_down_t, None, None, b_down, expert_size, "identity", config, h=h)
    p.union = union
    if p.active is not None:
        launch_compact(p)
    launch_out(p, token_mask=True)
    launch_finish(p)
    return p.y
